"""Run control: start or resume, stop on a preemption notice, stop on a non-finite step.

- ``build_or_restore_state``: a new state, or the newest checkpoint that verifies
  (with the input stream moved to its saved position);
- ``StopRequest``: SIGTERM/SIGINT (or JAX's multi-process preemption sync point) ask
  the loop to save at the next step boundary and raise ``Preempted``;
- ``raise_if_nonfinite``: a non-finite step stops the run, naming the last good
  checkpoint (the step's gate already kept the NaN out of the state).
"""

from __future__ import annotations

import functools
import signal
import threading
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from resfuse_jax import checkpointing, config_lib, sharding
from resfuse_jax.errors import Preempted
from resfuse_jax.train.step import NO_NONFINITE_STEP, TrainState, init_state


class StopRequest:
  """SIGTERM/SIGINT -> save at the next step boundary and stop.

  One process: Python signal handlers set a flag. Several processes: JAX's
  preemption sync point (installed by ``jax.distributed.initialize``, on
  SIGTERM) makes every process stop at the same step; Python handlers are not
  installed there, so they cannot shadow JAX's.
  """

  def __init__(self):
    self.reason: str | None = None
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    self.reason = signal.Signals(signum).name

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
      self.reason = "the preemption notice (SIGTERM)"
    return self.reason is not None

  def stop(self, step: int, total: int, manager) -> None:
    """Waits for the checkpoint just saved, then raises ``Preempted`` (exit 0 in the CLI)."""
    checkpointing.wait_for_saves(manager)
    raise Preempted(
      f"stopped by {self.reason} at step {step}/{total}; checkpoint saved in "
      f"{manager.directory}: rerun the same command to resume"
    )

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _abstract(state: TrainState) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def raise_if_nonfinite(first_bad_step: int, manager, state: TrainState) -> None:
  """Stops on a non-finite step, naming the newest checkpoint that verifies on disk."""
  if first_bad_step != NO_NONFINITE_STEP:
    good = checkpointing.newest_verified_step(manager, _abstract(state))
    kept = "no checkpoint verifies" if good is None else f"step {good} verifies"
    raise FloatingPointError(
      f"non-finite training loss or gradient at step {first_bad_step} (that update was not "
      f"applied); stopping. The last good checkpoint is kept: {kept}, in {manager.directory}"
    )


def build_or_restore_state(
  config: ml_collections.ConfigDict, model: nn.Module, tx, mesh, manager, train_iter
) -> tuple[TrainState, int]:
  """A new state created already replicated on the mesh, or the latest checkpoint's.

  Restoring also moves ``train_iter`` to the saved position. Returns (state, step).
  """
  patch = tuple(config.data.patch_size)
  sharding.check_patch_size(patch, config_lib.downsampling(config.model)[0], mesh)
  init = jax.jit(
    functools.partial(init_state, model, tx, patch), out_shardings=sharding.replicated(mesh)
  )
  state = init(jax.random.key(config.seed))
  if jax.process_index() == 0:
    logging.info(
      "%s (conv %s)\n%s",
      config.model.name,
      config.model.conv_impl,
      parameter_overview.get_parameter_overview(state.params),
    )
  if manager.latest_step() is None:
    return state, 0
  state, step = checkpointing.restore_verified(manager, _abstract(state), train_iter)
  logging.info("Resumed from %s at step %d (verified)", manager.directory, step)
  return state, step


def parameter_checksum(params: Any) -> float:
  """Sum of this process's copy of the (replicated) parameters, in float64."""
  return float(
    sum(np.sum(np.asarray(x.addressable_data(0), np.float64)) for x in jax.tree.leaves(params))
  )


def saved_data_state(directory: str | Path) -> tuple[int, bytes] | None:
  """(step, this process's data-iterator state) of the newest finished step under
  ``directory``, read before anything is built (None if there is none): a resumed run
  must draw its crops where that step's did (`train.inputs.resident_placement`)."""
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  steps = [
    int(p.name)
    for p in Path(directory).glob("*")
    if p.name.isdigit() and (p / "commit_success.txt").is_file() and (p / "data" / name).is_file()
  ]  # fmt: skip
  if not steps:
    return None
  step = max(steps)
  return step, (Path(directory) / str(step) / "data" / name).read_bytes()
