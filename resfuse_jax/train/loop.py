"""The training loop: steps, and at its boundaries logging, validation and checkpoints.

Host syncs happen only at those boundaries (``train.log_every``,
``eval.every_steps``, ``checkpoint.every_steps``, the last step, a stop request).
Validation runs the one evaluation path (``evaluation.evaluate_cases``): the periodic
one on the resampled (preprocessed) grid, a cheap progress signal logged as
``val_resampled_grid/*``; the final one on each case's original grid (``val/*``, the
results), with its resampled-grid Dice logged beside it so the progress curve and the
best-checkpoint metric compare like with like.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from resfuse_jax import backend, checkpointing, data, sharding
from resfuse_jax.evaluation import evaluation, grids, metrics
from resfuse_jax.inference import postprocess, tiler
from resfuse_jax.train import control, resident
from resfuse_jax.train.inputs import RunData
from resfuse_jax.train.step import TrainMetrics, TrainState, input_sharding

RESAMPLED_PREFIX = "val_resampled_grid"  # TensorBoard: the periodic validation's scalars


class Progress:
  """Steps/s and ETA at logging points (clu's periodic_actions would import TensorFlow).

  The clock starts once the first step has returned: that call traced and compiled the
  step function (seconds to minutes, once), and counting it made the first ETA far off.
  """

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.compiled = False

  def step_done(self, step: int) -> None:
    """Call after every step's dispatch; the first one restarts the clock after compiling."""
    if not self.compiled:
      self.compiled = True
      self.last_step, self.last_time = step, time.perf_counter()

  def report(self, step: int) -> dict[str, float] | None:
    """Speed since the last report; None when no step after the compiling one has run."""
    if step <= self.last_step:
      return None
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    return {"steps_per_sec": rate, "eta_sec": eta}


@dataclasses.dataclass
class Loop:
  """What the loop runs with: compiled functions, the data stream and the outputs."""

  step_fn: Callable
  window_fn: Callable
  train_iter: Any
  manager: Any
  writer: Any
  mesh: Any
  final_masks: list | None = None  # the final validation's cropped masks (original grids)
  final_resampled_dice: dict | None = None  # its Dice per region on the resampled grid


def validate(
  window_fn: Callable,
  params: Any,
  cases: list[data.Case],
  config,
  mesh,
  on_case: evaluation.CaseHook | None = None,
  lesion_wise: bool = False,
  grid: str = grids.RESAMPLED,
  collect: list | None = None,
) -> metrics.RegionMetrics:
  """Validation through the one evaluation path, windows split over the mesh's 'data'.

  On one device the window function goes to the tiler whole (`tiler.JaxWindow`), so
  the backend's tiling placement applies (on a GPU: cut, predicted and blended on the
  device); over several devices the host cuts the windows and the mesh splits them.
  ``grid``: where the scores are computed (``evaluation.grids``); ``collect`` keeps every
  case's masks there; ``lesion_wise`` adds BraTS lesion-wise metrics.
  """
  n = mesh.shape[sharding.DATA]
  batch = -(-backend.resolve("eval_batch_size", config.eval.batch_size) // n) * n
  tiles_sharding = sharding.data_sharding(mesh)

  def predict(tiles: np.ndarray) -> np.ndarray:
    return np.asarray(window_fn(params, sharding.put_global(tiles, tiles_sharding)))

  if mesh.size == 1:
    predict = tiler.JaxWindow(window_fn, params)

  return evaluation.evaluate_cases(
    predict, cases, config, batch_size=batch, lesion_wise=lesion_wise, on_case=on_case,
    grid=grid, collect=collect,
  )  # fmt: skip


def resampled_dice_hook(regions: dict, rows: list) -> evaluation.CaseHook:
  """An ``evaluate_cases`` hook appending each case's Dice per region on the resampled grid."""

  def hook(case, probs, masks, row):
    del probs, row
    ref = postprocess.region_masks(np.asarray(case.label), regions)
    rows.append([metrics.dice(masks[..., r], ref[..., r]) for r in range(ref.shape[-1])])

  return hook


def final_validation(config, loop: Loop, state: TrainState, run: RunData):
  """The last validation, on the original grids, keeping every case's masks there for
  choosing the post-processing (and the resampled-grid Dice, ``loop.final_resampled_dice``)."""
  collected, resampled = [], []
  val = validate(
    loop.window_fn, state.params, run.val_cases, config, loop.mesh,
    resampled_dice_hook(run.dataset.regions, resampled), lesion_wise=run.dataset.brats_like,
    grid=grids.ORIGINAL, collect=collected,
  )  # fmt: skip
  loop.final_masks = collected
  means = np.mean(resampled, axis=0)
  loop.final_resampled_dice = dict(zip(run.dataset.region_names, map(float, means)))
  loop.final_resampled_dice["mean"] = float(np.mean(means))
  return val


def _format_eta(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  return f"{m}m{s:02d}s"


def _log_train(step: int, total: int, computed: dict, progress: Progress, writer) -> None:
  scalars = {f"train/{k}": float(v) for k, v in computed.items()}
  speed = progress.report(step)
  if speed is not None:
    scalars["train/steps_per_sec"] = speed["steps_per_sec"]
  writer.write_scalars(step, scalars)
  timing = (
    f"{speed['steps_per_sec']:.2f} steps/s | ETA {_format_eta(speed['eta_sec'])}"
    if speed
    else "compiled the step; speed and ETA from the next logging step"
  )
  logging.info("step %d/%d | loss %.4f | %s", step, total, scalars["train/loss"], timing)


def _validate_and_log(config, loop: Loop, state, run: RunData, step: int):
  """Validates; returns (its metrics, the resampled-grid mean Dice: comparable across steps)."""
  t0 = time.perf_counter()
  if step == config.train.steps:
    val = final_validation(config, loop, state, run)
    progress = loop.final_resampled_dice
    scalars = {f"{RESAMPLED_PREFIX}/dice_{r}": v for r, v in progress.items()}
    scalars.update({f"val/{m}_{r}": v for m, d in val.summary().items() for r, v in d.items()})
    where = "original grids"
  else:
    val = validate(loop.window_fn, state.params, run.val_cases, config, loop.mesh)
    loop.final_masks = None
    progress = val.summary()["dice"]
    scalars = {
      f"{RESAMPLED_PREFIX}/{m}_{r}": v for m, d in val.summary().items() for r, v in d.items()
    }
    where = "resampled grid, a progress signal"
  loop.writer.write_scalars(step, scalars)
  logging.info(
    "step %d validation (%d cases, %.1fs, %s): Dice %s",
    step,
    len(run.val_cases),
    time.perf_counter() - t0,
    where,
    ", ".join(f"{r} {v:.4f}" for r, v in val.summary()["dice"].items()),
  )
  return val, progress["mean"]


@dataclasses.dataclass
class _Boundary:
  """What one step boundary does: log, validate, save, stop."""

  log: bool
  evaluate: bool
  save: bool
  stop: bool


def _boundary(config, step: int, stop: control.StopRequest) -> _Boundary:
  total = config.train.steps
  is_eval = step % config.eval.every_steps == 0 or step == total
  preempted = stop.requested(step)
  return _Boundary(
    log=step % config.train.log_every == 0 or step == total,
    evaluate=is_eval and not preempted,
    save=is_eval or preempted or step % config.checkpoint.every_steps == 0,
    stop=preempted,
  )


def train_loop(config, loop: Loop, state: TrainState, start_step: int, run: RunData):
  """Steps ``start_step + 1 .. train.steps``; returns (state, last validation or None).

  Host syncs only at logging, evaluation and checkpoint points. SIGTERM/SIGINT
  save at the next step boundary and raise ``Preempted``.
  """
  total = config.train.steps
  batch_sharding = input_sharding(config, loop.mesh)
  progress = Progress(total, start_step)
  pending: TrainMetrics | None = None
  val = None
  stop = control.StopRequest()
  try:
    for step in range(start_step + 1, total + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(loop.train_iter)
        if not isinstance(loop.train_iter, resident.ResidentStream):  # already on the devices
          batch = sharding.put_batch(batch, batch_sharding)
        state, step_metrics = loop.step_fn(state, batch)
      progress.step_done(step)
      pending = step_metrics if pending is None else pending.merge(step_metrics)
      at = _boundary(config, step, stop)
      if at.log or at.save:  # the finiteness check rides on the logging sync
        computed = {k: np.asarray(v) for k, v in pending.compute().items()}
        control.raise_if_nonfinite(int(computed.pop("nonfinite_step")), loop.manager, state)
      if at.log:
        pending = None
        _log_train(step, total, computed, progress, loop.writer)
      ckpt_metrics = None
      if at.evaluate:
        val, progress_dice = _validate_and_log(config, loop, state, run, step)
        ckpt_metrics = {checkpointing.BEST_METRIC: progress_dice}
        progress.last_time = time.perf_counter()  # keep evaluation out of steps/s
      if at.save:
        checkpointing.save(loop.manager, step, state, loop.train_iter, ckpt_metrics)
        loop.writer.flush()  # a killed run keeps its curves up to its last checkpoint
      if at.stop:
        stop.stop(step, total, loop.manager)
  finally:
    stop.restore()
    checkpointing.wait_for_saves(loop.manager)  # a good save in flight completes first
  return state, val
