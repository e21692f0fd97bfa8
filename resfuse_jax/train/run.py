"""``train_and_evaluate(config, workdir)``: the named stages of a training run.

Claim W (lock, config), prepare the data, build or restore the state, run the
loop, then finalize: the last validation's results, per-case rows and the
post-processing chosen on them (``evaluation.finalize``, which ``evaluate`` runs too).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import ml_collections
from absl import logging

from resfuse_jax import checkpointing, files, models, sharding, writers
from resfuse_jax.evaluation.finalize import finalize, results_record
from resfuse_jax.inference import predictor
from resfuse_jax.task import Task
from resfuse_jax.train import control, loop, resident
from resfuse_jax.train.inputs import RunData, make_input, prepare_data
from resfuse_jax.train.step import compile_train_step, make_optimizer
from resfuse_jax.workdir import Workdir


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | Path, plan_record: dict | None = None
) -> dict:
  """Trains ``config.model`` on ``config.data``, resuming from ``workdir``; returns results.

  Process 0 holds the workdir's lock for the whole run: a second run on the same
  workdir fails at once, naming the holder. ``plan_record`` (``main --plan``: the plan
  ``config`` was planned with) goes to ``W/plan.json`` once W is claimed.
  """
  task = Task.from_config(config)
  w = Workdir(files.make_dirs(workdir))
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      stack.enter_context(w.lock("training run"))
      w.claim(config)
      if plan_record is not None:
        w.write_plan(plan_record)
    return _train_and_evaluate(task, w)


def _train_and_evaluate(task: Task, w: Workdir) -> dict:
  config = task.config
  run = prepare_data(task, w)
  mesh = sharding.make_mesh(config.mesh)
  train_iter = make_input(task, run, mesh, control.saved_data_state(w.checkpoints_dir))
  tx = make_optimizer(config.train)
  manager = checkpointing.make_manager(w.checkpoints_dir, config.checkpoint.keep)
  writer = writers.create(w.path, just_logging=jax.process_index() != 0)
  try:
    state, start_step = control.build_or_restore_state(
      config, task.model, tx, mesh, manager, train_iter
    )
    if start_step == 0:
      writer.write_hparams(dict(config.to_dict()))
      writer.flush()
    resident_layout = None
    if isinstance(train_iter, resident.ResidentStream):
      resident_layout = train_iter.layout
    loop_ = loop.Loop(
      step_fn=compile_train_step(
        config, task.model, tx, task.region_values, mesh, resident_layout=resident_layout
      ),
      window_fn=predictor.make_sharded_window_fn(task.model, mesh),
      train_iter=train_iter,
      manager=manager,
      writer=writer,
      mesh=mesh,
    )
    state, val = loop.train_loop(config, loop_, state, start_step, run)
    writer.flush()
    return finish(task, w, loop_, state, run, val)
  finally:
    writer.close()
    manager.close()


def finish(task: Task, w: Workdir, loop_: loop.Loop, state, run: RunData, val) -> dict:
  """The final validation's results in W (process 0 writes); ``val`` None: evaluate again.

  A resumed run that had already finished has no final validation in memory.
  """
  config = task.config
  logging.info(  # equal on every process of a multi-host run: the replicas agree
    "process %d/%d: final parameter checksum %.12e",
    jax.process_index(),
    jax.process_count(),
    control.parameter_checksum(state.params),
  )
  if val is None or loop_.final_masks is None:
    val = loop.final_validation(config, loop_, state, run)
  step = int(jax.device_get(state.step))
  norms = models.fusion_weight_norms(state.params)  # ResFuse's learned W_l, per level
  extra = {"fusion_weight_norms": norms} if norms else {}
  if jax.process_index() != 0:
    return finalize_summary(task, step, models.count_params(state.params), val, extra)
  results = finalize(
    w, task, step, models.count_params(state.params), val, loop_.final_masks,
    extra=extra, keep_masks=True,
  )  # fmt: skip
  _print_summary(task, results)
  return results


def finalize_summary(task: Task, step: int, num_params: int, val, extra: dict) -> dict:
  """What the other processes of a multi-host run return (process 0 writes the files)."""
  return {**results_record(task.config, step, num_params, val), "std": val.std(), **extra}


def _print_summary(task: Task, results: dict) -> None:
  print(
    f"Validation Dice over {results['cases']} cases ({task.config.model.name}, step "
    f"{results['steps']}): " + ", ".join(f"{r} {v:.4f}" for r, v in results["dice"].items())
  )
  if "lesion_dice" in results:
    after = results["postprocessed"]["lesion_dice"]
    print(
      "Lesion-wise Dice before / after post-processing: "
      + ", ".join(
        f"{r} {results['lesion_dice'][r]:.4f} / {after[r]:.4f}" for r in task.region_names
      )
    )
