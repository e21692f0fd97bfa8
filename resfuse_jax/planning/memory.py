"""What a training step needs, measured: XLA's memory analysis of the compiled step, and
one timed step; and the budget it must fit.

``Measurer`` compiles training's own step (`train.step.make_step_fn`, augmentation on the
device, crops in) for a candidate geometry without running it, and reads
``compiled.memory_analysis()``: temp + arguments + outputs − aliased (the donated state).
That number tracks the measured peak (DESIGN §5: ResFuse 16–256, batch 2, f32 at 128³:
12.2 GiB estimated, 13.8 GB peak RSS). A compile costs ~10 s on a CPU, so the search
asks for few (`planning.search`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resfuse_jax import backend
from resfuse_jax.data import resident as data_resident
from resfuse_jax.task import Task
from resfuse_jax.train.step import init_state, input_shapes, make_optimizer, make_step_fn

GiB = 2**30
HEADROOM = 0.85  # of the device's own limit: the host pipeline, Python and XLA's own buffers


def step_memory_bytes(analysis: Any) -> float:
  """XLA's estimate of a compiled step's memory: temp + arguments + outputs − aliased."""
  if analysis is None:
    return float("nan")
  return float(
    analysis.temp_size_in_bytes
    + analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
  )


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One geometry the planner may choose (per-device batch)."""

  patch: tuple[int, int, int]
  batch: int
  strides: tuple[tuple[int, int, int], ...]
  features: tuple[int, ...]

  @property
  def voxels(self) -> int:
    return int(np.prod(self.patch)) * self.batch


def candidate_config(config: ml_collections.ConfigDict, c: Candidate) -> ml_collections.ConfigDict:
  """``config`` with the candidate's patch, batch, features and strides."""
  out = config.copy_and_resolve_references()
  out.data.patch_size = tuple(c.patch)
  out.train.batch_size = int(c.batch)
  out.model.features = tuple(c.features)
  if "strides" in out.model:
    out.model.strides = tuple(tuple(s) for s in c.strides)
  elif any(s not in ((1, 1, 1), (2, 2, 2)) for s in c.strides[1:]):
    raise NotImplementedError("config.model.strides is not in this build: isotropic models only")
  return out


class Measurer:
  """Compiles (and times) the training step of candidates; each compiled once."""

  def __init__(self, config: ml_collections.ConfigDict, timed: bool = True):
    self.config = config
    self.timed = timed  # False: `seconds` is NaN (tests; a plan without the time cap)
    self._compiled: dict[Candidate, tuple[Any, Any, float]] = {}

  def _compile(self, c: Candidate):
    if c not in self._compiled:
      cfg = candidate_config(self.config, c)
      task = Task.from_config(cfg)
      tx = make_optimizer(cfg.train)
      init = functools.partial(init_state, task.model, tx, task.patch_size)
      state = jax.eval_shape(init, jax.random.key(0))
      step = make_step_fn(cfg, task.model, tx, task.region_values)
      batch = input_shapes(cfg)
      executable = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
      memory = step_memory_bytes(executable.memory_analysis())
      self._compiled[c] = (executable, (state, batch), memory)
    return self._compiled[c]

  def memory(self, c: Candidate) -> float:
    """XLA's estimate of the candidate's step, in bytes."""
    return self._compile(c)[2]

  def seconds(self, c: Candidate) -> float:
    """One step of the candidate on zeros (parameters) and noise (scans), timed."""
    if not self.timed:
      return float("nan")
    executable, (state_shapes, batch_shapes), _ = self._compile(c)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_shapes)
    rng = np.random.default_rng(0)
    batch = {
      k: jnp.asarray(
        rng.integers(0, 2, s.shape) if k == "label" else rng.normal(size=s.shape), s.dtype
      )
      for k, s in batch_shapes.items()
    }
    jax.block_until_ready((state, batch))
    start = time.perf_counter()
    jax.block_until_ready(executable(state, batch))
    return time.perf_counter() - start


def device_limit(memory_gb: float | None) -> tuple[int, str]:
  """(bytes, why): ``--memory_gb``, else ``HEADROOM`` of the device's own limit."""
  if memory_gb is not None:
    return int(memory_gb * GiB), f"--memory_gb={memory_gb:g} (GiB)"
  limit = backend.device_memory_bytes()
  where = "available RAM" if jax.default_backend() == "cpu" else "memory_stats()['bytes_limit']"
  return int(HEADROOM * limit), f"{HEADROOM:g} x the device's {where} ({limit / GiB:.2f} GiB)"


def resident_reserve(config, shapes, c: Candidate) -> tuple[int, str]:
  """(bytes, why) the training set takes on the device when the run would hold it there.

  The same test as `train.inputs.resident_placement` for the replicated layout: resident
  when ``data.resident`` resolves to the device and the packed set fits
  ``data.resident_memory_fraction`` of the device.
  """
  cfg = config.data
  if backend.resolve("resident", cfg.resident, where="data.resident") != "device":
    return 0, "data not resident (host pipeline)"
  task = Task.from_config(candidate_config(config, c))
  need = data_resident.resident_bytes(
    shapes, len(task.regions), task.patch_size, task.crop_shape, cfg.resident_dtype
  )
  if need > cfg.resident_memory_fraction * backend.device_memory_bytes():
    return 0, "data not resident (the training set does not fit the device)"
  return int(need), f"minus the resident training set ({need / GiB:.2f} GiB)"
