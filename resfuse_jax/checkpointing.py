"""Orbax checkpoints of the train state and the Grain iterator; export folders' params.

Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves no step that ``latest_step`` would restore.
A training checkpoint step holds ``state`` (the TrainState: step, params,
opt_state) and ``data`` (the Grain iterator position); an export folder holds
``params`` only. Names say what they restore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from resfuse_jax.errors import CheckpointError

BEST_METRIC = "val_dice_mean"
EXPORT_FORMAT = "resfuse_jax-export-1"
EXPORT_SERVING_FILE = "serving/window.jax_export"


def make_manager(directory: str | Path, keep: int) -> ocp.CheckpointManager:
  """For training: keeps the ``keep`` latest steps and the best by validation mean Dice."""
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


def restore_train_state(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any
) -> Any:
  """The whole TrainState (shardings from ``abstract_state``); the iterator in place."""
  args = ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract_state),
    data=grain.checkpoint.CheckpointRestore(data_iterator),
  )
  return manager.restore(step, args=args).state


def checkpoint_steps(directory: str | Path) -> list[int]:
  """Finished steps under a training workdir's ``checkpoints/``, read-only (creates nothing)."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
  try:
    return list(manager.all_steps())
  finally:
    manager.close()


def restore_params(directory: str | Path, step: int | None, abstract_params: Any) -> tuple:
  """Only the parameters of step ``step`` (default: the latest): no optimiser state is read.

  Returns ``(params, step)``; shardings come from ``abstract_params``.
  """
  directory = Path(directory).absolute()
  steps = checkpoint_steps(directory)
  if not steps:
    raise CheckpointError(f"no finished checkpoint under {directory}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise CheckpointError(f"no checkpoint of step {step} under {directory}; it has {steps}")
  item = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(
    item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
  )
  restored = ocp.PyTreeCheckpointer().restore(directory / str(step) / "state", args=args)
  return restored["params"], step


# ----- Export folders (written by eval.exporting) ---------------------------------------


def is_export(path: str | Path) -> bool:
  return (Path(path) / "export.json").is_file()


def export_metadata(path: str | Path) -> dict:
  meta_path = Path(path) / "export.json"
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{meta_path}: cannot read the export's metadata: {e}") from e
  if meta.get("format") != EXPORT_FORMAT:
    raise CheckpointError(f"{meta_path}: unknown export format {meta.get('format')!r}")
  return meta


def read_config(path: str | Path) -> ml_collections.ConfigDict:
  """``config.json`` of a training workdir or an export folder."""
  config_path = Path(path) / "config.json"
  if not config_path.is_file():
    raise CheckpointError(
      f"{path} is neither a training workdir nor an export: {config_path} is missing"
    )
  try:
    return ml_collections.ConfigDict(json.loads(config_path.read_text()))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e


def save_export_params(path: str | Path, params: Any) -> None:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save((Path(path) / "params").absolute(), params)
  checkpointer.wait_until_finished()


def load_export_params(path: str | Path, abstract_params: Any) -> Any:
  return ocp.StandardCheckpointer().restore((Path(path) / "params").absolute(), abstract_params)
