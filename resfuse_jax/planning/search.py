"""Choosing the largest geometry that fits, with few compiles.

Memory is modelled as fixed + per-voxel × (patch voxels × batch), fitted from two
compiles of the largest patch (batch b and 2b: the same topology, so the difference is
the activations); a choice is then verified by compiling it, and a miss refines the
per-voxel term from that compile. On a CPU the choice is also timed (one step) and,
over the time cap, scaled down by step time ∝ voxels × batch, then verified again.
The `measurer` is anything with ``memory(candidate)`` and ``seconds(candidate)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from resfuse_jax.errors import ConfigError
from resfuse_jax.planning.memory import Candidate, GiB

MAX_TRIES = 8  # verifying compiles (and timed steps) after the two probes
TIME_TARGET = 0.8  # over the time cap, aim at this share of it (one timed step is noisy)


class PlanError(ConfigError):
  """No geometry fits the budget: the message gives the numbers."""


@dataclasses.dataclass
class Limits:
  budget: float  # bytes
  max_step_s: float | None  # None: no time cap
  batch_min: int  # per device, a multiple of unit
  batch_unit: int  # train.grad_accum
  batch_cap: Callable[[Sequence[int]], int]  # patch -> largest batch the 5% rule allows
  fixed_batch: int | None = None


@dataclasses.dataclass
class Result:
  candidate: Candidate
  memory_bytes: float
  step_seconds: float
  over_time_cap: bool
  trials: list[dict]


@dataclasses.dataclass
class _Model:
  fixed: float
  per_voxel: float
  seconds_per_voxel: float | None = None

  def fits(self, c: Candidate, limits: Limits) -> bool:
    memory_ok = self.fixed + self.per_voxel * c.voxels <= limits.budget
    time_ok = self.seconds_per_voxel is None or self.seconds_per_voxel * c.voxels <= (
      limits.max_step_s
    )
    return memory_ok and time_ok


def _batches(patch, limits: Limits) -> list[int]:
  """The batches to try for ``patch``, largest first."""
  if limits.fixed_batch is not None:
    return [limits.fixed_batch]
  top = max(limits.batch_cap(patch), limits.batch_min)
  top -= top % limits.batch_unit
  return list(range(top, limits.batch_min - 1, -limits.batch_unit))


def _choose(options, make, model: _Model, limits: Limits, start: int) -> tuple[int, Candidate]:
  """The first option from ``start`` whose smallest batch the model lets fit, at the
  largest batch that fits; the smallest option if none does."""
  for i in range(start, len(options)):
    for batch in _batches(options[i][0], limits):
      c = make(i, batch)
      if model.fits(c, limits):
        return i, c
  last = len(options) - 1
  return last, make(last, _batches(options[last][0], limits)[-1])


def _too_small(c: Candidate, memory: float, limits: Limits, why: str) -> PlanError:
  return PlanError(
    f"the memory budget is too small: the smallest allowed step (patch {list(c.patch)}, batch "
    f"{c.batch}, features {list(c.features)}) needs {memory / GiB:.3f} GiB by XLA's memory "
    f"analysis, the budget is {limits.budget / GiB:.3f} GiB ({why}); raise --memory_gb, use "
    "smaller config.model.features, or fewer voxels (a coarser data.target_spacing)"
  )


def search(options, make, measurer, limits: Limits, budget_why: str = "") -> Result:
  """``options``: (patch, strides) largest first; ``make(index, batch)`` -> Candidate."""
  trials: list[dict] = []

  def measured(c: Candidate, what: str) -> float:
    memory = measurer.memory(c)
    trials.append({"patch": list(c.patch), "batch": c.batch, "memory_bytes": memory, "why": what})
    return memory

  b0 = _batches(options[0][0], limits)[-1]
  first, second = make(0, b0), make(0, 2 * b0)
  m1, m2 = measured(first, "probe"), measured(second, "probe")
  per_voxel = max((m2 - m1) / (second.voxels - first.voxels), 0.0)
  model = _Model(fixed=m1 - per_voxel * first.voxels, per_voxel=per_voxel)
  i, c = _choose(options, make, model, limits, 0)
  smallest = len(options) - 1
  for _ in range(MAX_TRIES):
    memory = measured(c, "choice")
    at_floor = i == smallest and c.batch == _batches(options[i][0], limits)[-1]
    if memory > limits.budget:
      if at_floor:
        raise _too_small(c, memory, limits, budget_why)
      model.per_voxel = max(model.per_voxel, (memory - model.fixed) / c.voxels) * 1.02
      i, c = _choose(options, make, model, limits, i)
      continue
    seconds = measurer.seconds(c)
    trials[-1]["seconds"] = seconds
    over = limits.max_step_s is not None and seconds > limits.max_step_s  # NaN: not timed
    if not over or at_floor:
      return Result(c, memory, seconds, over, trials)
    model.seconds_per_voxel = seconds / c.voxels / TIME_TARGET
    i, c = _choose(options, make, model, limits, i)
  raise PlanError(f"no geometry verified within {MAX_TRIES} compiles; tried {trials}")
