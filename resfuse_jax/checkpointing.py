"""Orbax checkpoints of the train state and the Grain iterator, side by side.

Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves no step that ``latest_step`` would restore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "val_dice_mean"


def make_manager(directory: str | Path, keep: int) -> ocp.CheckpointManager:
  """Keeps the ``keep`` latest steps and the best step by validation mean Dice."""
  preservation = policies.AnyPreservationPolicy(
    [
      policies.LatestN(n=keep),
      policies.BestN(
        get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=preservation, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(
    Path(directory).absolute(), options=options, item_names=("state", "data")
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iterator: Any,
  metrics: dict[str, float] | None = None,
) -> None:
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
  )
  manager.save(step, args=args, metrics=metrics, force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any):
  """Restores the state (shardings from ``abstract_state``) and the iterator in place."""
  args = ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract_state),
    data=grain.checkpoint.CheckpointRestore(data_iterator),
  )
  return manager.restore(step, args=args).state


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """Restores only the train state (for evaluation and prediction)."""
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
  return manager.restore(step, args=args).state
