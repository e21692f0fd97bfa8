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

from resfuse_jax import backend, data, sharding, validation
from resfuse_jax.data import pipeline
from resfuse_jax.data import resident as data_resident
from resfuse_jax.data.fingerprint import Fingerprint
from resfuse_jax.errors import ConfigError
from resfuse_jax.task import Task
from resfuse_jax.train import resident
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


def resident_placement(
  task: Task, run: RunData, shards: int = 1, saved: tuple[int, bytes] | None = None
) -> str:
  """``data.resident`` resolved: 'replicated', 'sharded' or 'host', said in one log line.

  A layout fits when one device's part of the packed training set (all of it replicated,
  ceil(N / shards) cases sharded over the ``shards`` data shards) is within
  ``resident_memory_fraction`` of one device's memory; ``resident_layout=auto`` takes
  replicated when it fits, else sharded. ``resident=auto`` takes the backend's column
  (`backend.DEFAULTS`: host on the CPU) and falls back to the host when neither fits;
  ``device`` refuses, with the numbers. A resumed run (``saved``: the newest
  checkpoint's (step, data state)) keeps drawing its crops where that step's came from:
  ``auto`` follows it, a setting that contradicts it is refused.
  """
  cfg = task.config.data
  shapes = [c.pre.shape for c in run.train_cases]
  layouts = _candidate_layouts(cfg, shards, len(shapes), saved)
  if layouts == ("host",):
    return "host"
  available = backend.device_memory_bytes()
  for layout in layouts:
    needed, said = _need(task, shapes, layout, shards, available)
    if needed <= cfg.resident_memory_fraction * available:
      logging.info("data.resident=%s: crops drawn on the device, %s", cfg.resident, said)
      return layout
  if cfg.resident == "device" or saved is not None:
    resuming = " (resuming a resident run)" if saved else ""
    raise ConfigError(
      f"data.resident={cfg.resident}{resuming}: {said}; use data.resident=auto or host, "
      "raise data.resident_memory_fraction, or store the scans as bfloat16 "
      "(data.resident_dtype=bfloat16)"
    )
  logging.info("data.resident=auto: crops come from the host pipeline (Grain): %s", said)
  return "host"


def _candidate_layouts(cfg, shards: int, cases: int, saved) -> tuple[str, ...]:
  """The resident layouts to try in order, or ('host',) when crops come from the host."""
  if saved is not None:
    return _resumed_layouts(cfg, shards, *saved)
  if cfg.resident == "host":
    return ("host",)
  if cfg.resident == "auto" and backend.resolve("resident", "auto") == "host":
    logging.info(
      "data.resident=auto on the %s backend: crops come from the host pipeline (Grain); "
      "data.resident=device puts the training set in device memory",
      jax.default_backend(),
    )
    return ("host",)
  if cfg.resident_layout != "auto":
    return (cfg.resident_layout,)
  if not 1 < shards <= cases:
    return ("replicated",)  # one shard is the whole set; a shard needs a case at least
  return ("replicated", "sharded")


def _need(task: Task, shapes, layout: str, shards: int, available: int) -> tuple[int, str]:
  """Bytes one device holds in ``layout``, and the sentence that says so with the budget."""
  cfg = task.config.data
  n = 1 if layout == "replicated" else shards
  needed = data_resident.resident_bytes(
    shapes, len(task.regions), task.patch_size, task.crop_shape, cfg.resident_dtype, n
  )
  held = data_resident.slots_per_shard(len(shapes), n)
  return needed, (
    f"{layout} ({held} of the {len(shapes)} training cases on each device) needs "
    f"{_size(needed)} a device ({cfg.resident_dtype} scans, padded to one shape), and "
    f"data.resident_memory_fraction={cfg.resident_memory_fraction:g} of the "
    f"{_size(available)} a device has is {_size(cfg.resident_memory_fraction * available)}"
  )


def _resumed_layouts(cfg, shards: int, step: int, state: bytes) -> tuple[str, ...]:
  """Where a resumed run's crops come from: ('host',) or its one resident layout."""
  was = resident.marker(state)
  where = f"the checkpoint of step {step}"
  if was is None:
    if cfg.resident == "device":
      raise ConfigError(
        f"{where} was written by a run whose crops came from the host pipeline (Grain), and "
        "data.resident=device would start another crop stream: resume it with "
        "data.resident=host or auto"
      )
    logging.info(
      "resuming step %d of a run fed by the host pipeline: crops keep coming from it", step
    )
    return ("host",)
  layout = str(was.get("layout", "replicated"))
  if cfg.resident == "host" or cfg.resident_layout not in ("auto", layout):
    raise ConfigError(
      f"{where} was written by a run whose crops were drawn on the device ({layout} layout), "
      f"and data.resident={cfg.resident}, data.resident_layout={cfg.resident_layout} would "
      f"draw them elsewhere: resume it with data.resident=device (or auto) and "
      f"data.resident_layout={layout} (or auto)"
    )
  if layout == "sharded" and was.get("shards") != shards:
    logging.warning(
      "%s dealt the training cases over %s data shards, this run has %d: its crops from here "
      "on differ from an uninterrupted run's (a sharded row is drawn from its shard's cases)",
      where, was.get("shards"), shards,
    )  # fmt: skip
  logging.info("resuming step %d of a device-resident run: %s layout", step, layout)
  return (layout,)


def _size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def make_input(task: Task, run: RunData, mesh, saved: tuple[int, bytes] | None = None) -> Any:
  """This process's input: the resident arrays (`train.resident.ResidentStream`: the
  whole set, or its devices' shards) or its iterator over its share of the batch stream.
  ``saved``: the newest checkpoint's (step, data state), which a resume follows."""
  config = task.config
  local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
  shards = mesh.shape[sharding.DATA]
  layout = resident_placement(task, run, shards, saved)
  if layout == "replicated":
    packed = data_resident.pack(
      run.train_cases, task.regions, task.patch_size, task.crop_shape, config.data.resident_dtype
    )
    arrays = resident.to_device(packed, sharding.replicated(mesh))
    return resident.ResidentStream(arrays, layout)  # one shard: the same on any mesh
  if layout == "sharded":
    arrays, held = resident.place_sharded(
      run.train_cases,
      task.regions,
      task.patch_size,
      task.crop_shape,
      config.data.resident_dtype,
      mesh,
    )
    logging.info(
      "process %d packed %d of the %d training cases (its devices' shards): %s",
      jax.process_index(),
      len(held),
      len(run.train_cases),
      " ".join(held) if len(held) <= 32 else f"{' '.join(held[:32])} ...",
    )
    return resident.ResidentStream(arrays, layout, shards)
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
