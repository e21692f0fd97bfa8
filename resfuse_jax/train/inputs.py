"""Training's data: the preprocessed cache, the splits, the cases, the patch stream.

``prepare_data`` builds (or reuses) the cache and fixes the fold in ``W/splits.json``
(``workdir.Workdir.splits``); ``make_input`` is this process's Grain iterator over
its share of the global batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

from resfuse_jax import data, sharding, validation
from resfuse_jax.data import pipeline
from resfuse_jax.data.fingerprint import Fingerprint
from resfuse_jax.task import Task
from resfuse_jax.workdir import Workdir


@dataclasses.dataclass
class RunData:
  """The cases of one run: its dataset, training and validation cases (memory-mapped)."""

  dataset: data.Dataset
  cache_dir: Path
  train_cases: list[data.Case]
  val_cases: list[data.Case]


def prepare_data(task: Task, workdir: Workdir) -> RunData:
  """Preprocessed cache (process 0 builds, the others then reuse it), splits, cases.

  Writes the workdir's splits and, for skipped cases, its bad-case list.
  """
  config = task.config
  is_main = jax.process_index() == 0
  files_ = data.find_cases(config.data)
  if is_main:
    cache_dir, good_ids, bad = data.prepare(config.data, files_)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("preprocessed cache")
  if not is_main:
    cache_dir, good_ids, bad = data.prepare(config.data, files_, progress=False)
  splits = workdir.splits(good_ids, config.data)
  val_ids = splits["val"][: config.eval.max_cases] if config.eval.max_cases else splits["val"]
  run = RunData(
    task.dataset,
    cache_dir,
    data.load_cases(cache_dir, splits["train"]),
    data.load_cases(cache_dir, val_ids),
  )
  require_foreground(run.train_cases, cache_dir)
  validation.check_against(config, Fingerprint.of_cases(run.train_cases + run.val_cases))
  if is_main:
    workdir.write_splits(splits, bad)
  logging.info(
    "%d training cases, %d validation cases (cache %s)",
    len(run.train_cases),
    len(run.val_cases),
    cache_dir,
  )
  return run


def require_foreground(cases: list[data.Case], cache_dir: Path) -> None:
  """Training on label maps that are background everywhere learns nothing: refused."""
  if any(len(loc) for c in cases for loc in (c.fg_locations or [])):
    return
  raise data.DataError(
    f"none of the {len(cases)} training cases has any foreground voxel in its label map "
    f"(cache {cache_dir}); check the label files (are they all zero?)"
  )


def make_input(task: Task, run: RunData, mesh) -> Any:
  """This process's iterator over its share of the global batch stream."""
  config = task.config
  local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
  return iter(
    pipeline.train_dataset(
      run.train_cases,
      patch_size=config.data.patch_size,
      batch_size=local_batch,
      regions=task.regions,
      fg_fraction=config.data.fg_fraction,
      seed=config.seed,
      crop_shape=task.crop_shape,
      workers=config.data.workers,
      prefetch=config.data.prefetch,
      read_threads=config.data.read_threads,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
    )
  )
