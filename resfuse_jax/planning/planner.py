"""The plan: fingerprint -> rules -> measured search -> ``plan.json``; and applying it.

``make_plan(config)`` returns the plan as a dict a person can read (values, the rule that
decided each, the fingerprint's summary, every compile tried); ``apply_plan`` puts it into
a config, values given explicitly on the command line winning; ``plan_and_train`` is
``main --plan=auto|FILE``: plan (or reuse W's plan when resuming), apply, train.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from resfuse_jax import config_lib, files, train, validation
from resfuse_jax.errors import ConfigError
from resfuse_jax.planning import fingerprint as fingerprint_lib
from resfuse_jax.planning import memory, rules
from resfuse_jax.planning.search import Limits, PlanError, search
from resfuse_jax.workdir import Workdir

VERSION = 1
DEFAULT_MAX_STEP_S = 5.0  # CPU only: a laptop is not planned into minute-long steps
# plan.json key -> the config key it sets
PLANNED = {
  "target_spacing": "data.target_spacing",
  "patch_size": "data.patch_size",
  "batch_size": "train.batch_size",
  "features": "model.features",
  "strides": "model.strides",
}


def _fixed(config, explicit: Collection[str]) -> dict:
  """The planned values the command line gave (they win), by plan key."""
  out = {}
  for key, path in PLANNED.items():
    if path in explicit and path.split(".")[-1] in config_lib.lookup(config, path)[0]:
      value = config_lib.get_path(config, path)
      if value is not None:
        out[key] = json.loads(json.dumps(value))
  return out


def _data_devices(config) -> int:
  if config.mesh.spatial != 1:
    raise PlanError(
      f"the planner plans one device's share of the batch; mesh.spatial={config.mesh.spatial} "
      "splits patches over devices: plan with mesh.spatial=1, or give the geometry explicitly"
    )
  devices = len(jax.devices())
  return devices if config.mesh.data == -1 else int(config.mesh.data)


def _options(config, fixed: dict, spacing, median, largest) -> tuple[list, int]:
  """(patch, strides) options, largest first, and the number of encoder levels (0: free)."""
  levels = len(fixed["features"]) if "features" in fixed else 0
  max_pools = (levels or len(config.model.features)) - 1
  strides = fixed.get("strides")
  if strides is not None:
    strides = tuple(tuple(int(a) for a in s) for s in strides)
  if "patch_size" in fixed:
    patch = [int(p) for p in fixed["patch_size"]]
    return [(patch, rules.topology(spacing, patch, max_pools, strides)[0])], levels
  return list(rules.patch_sequence(spacing, median, largest, max_pools, strides)), levels


def _maker(config, options, levels: int):
  widths = tuple(int(f) for f in config.model.features)

  def make(i: int, batch: int) -> memory.Candidate:
    patch, strides = options[i]
    if levels:  # the features were given: one stride triple per level
      strides = tuple(strides[:levels]) + ((1, 1, 1),) * (levels - len(strides))
    return memory.Candidate(tuple(patch), int(batch), tuple(strides), widths[: len(strides)])

  return make


def _time_cap(max_step_s: float | None) -> float | None:
  return max_step_s if jax.default_backend() == "cpu" and max_step_s and max_step_s > 0 else None


def make_plan(
  config: ml_collections.ConfigDict,
  memory_gb: float | None = None,
  max_step_s: float | None = DEFAULT_MAX_STEP_S,
  explicit: Collection[str] = (),
  measurer=None,
) -> dict:
  """The plan of ``config``'s dataset on this device (see the module docstring)."""
  fp = fingerprint_lib.fingerprint(config.data)
  fixed = _fixed(config, explicit)
  spacing = fixed.get("target_spacing")
  if spacing is None:
    spacing = rules.target_spacing(fp.spacings, fp.cropped_shapes)
  shapes = rules.resampled_shapes(fp.spacings, fp.cropped_shapes, spacing)
  median = [int(round(m)) for m in np.median(shapes, axis=0)]
  options, levels = _options(config, fixed, spacing, median, shapes.max(axis=0))
  make = _maker(config, options, levels)
  devices = _data_devices(config)
  limit, why = memory.device_limit(memory_gb)
  reserve, reserve_why = memory.resident_reserve(config, shapes, make(0, 2))
  unit = int(config.train.grad_accum)
  limits = Limits(
    budget=limit - reserve,
    max_step_s=_time_cap(max_step_s),
    batch_min=-(-rules.MIN_BATCH // unit) * unit,
    batch_unit=unit,
    batch_cap=lambda p: rules.batch_cap(median, len(fp.records), p) // devices,
    fixed_batch=None if "batch_size" not in fixed else _per_device(fixed["batch_size"], devices),
  )
  budget_why = f"{why}, {reserve_why}"
  result = search(options, make, measurer or memory.Measurer(config), limits, budget_why)
  c = result.candidate
  values = {
    "target_spacing": [round(float(s), 6) for s in spacing],
    "patch_size": list(c.patch),
    "batch_size": c.batch * devices,
    "strides": [list(s) for s in c.strides],
    "features": list(c.features),
  }
  return {
    "version": VERSION,
    "dataset": config.data.name,
    "model": config.model.name,
    **values,
    "memory_bytes": int(result.memory_bytes),
    "memory_budget_bytes": int(limits.budget),
    "step_seconds": None if math.isnan(result.step_seconds) else round(result.step_seconds, 3),
    "max_step_s": limits.max_step_s,
    "median_shape": median,
    "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind} x {devices} (data)",
    "rules": _rules(fixed, budget_why, result.over_time_cap),
    "fingerprint": fp.summary(),
    "trials": result.trials,
  }


def _per_device(batch: int, devices: int) -> int:
  if batch % devices:
    raise ConfigError(f"train.batch_size={batch} must be divisible by the {devices} data devices")
  return batch // devices


def _rules(fixed: dict, budget_why: str, over_time_cap: bool) -> dict:
  out = {
    k: (f"given: --config.{PLANNED[k]}" if k in fixed else rule) for k, rule in rules.RULES.items()
  }
  out["memory_bytes"] = (
    "XLA's memory analysis of the chosen step: temp + arguments + outputs - aliased"
  )
  out["memory_budget_bytes"] = budget_why
  if over_time_cap:
    out["step_seconds"] = "over the time cap even at the smallest patch and batch (kept)"
  return out


def apply_plan(
  config: ml_collections.ConfigDict, plan: dict, explicit: Collection[str] = ()
) -> tuple[ml_collections.ConfigDict, dict]:
  """(config with the plan's values, the record for W/plan.json): explicit values win."""
  out = config.copy_and_resolve_references()
  applied, given = {}, {}
  for key, path in PLANNED.items():
    node, leaf = config_lib.lookup(out, path)
    if path in explicit:
      given[path] = json.loads(json.dumps(node.get(leaf)))
      continue
    value = plan[key]
    if leaf not in node:  # a build without per-axis strides: only the isotropic model
      if any(tuple(s) not in ((1, 1, 1), (2, 2, 2)) for s in value[1:]):
        raise ConfigError(f"the plan's {key}={value} needs config.{path}, which this build lacks")
      continue
    node[leaf] = _as_tuples(value)
    applied[path] = value
  return out, {**plan, "applied": applied, "explicit": given}


def _as_tuples(value):
  """JSON lists as the config's tuples, nested ([[1, 1, 1], ...] -> ((1, 1, 1), ...))."""
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def read_plan(path: str | Path) -> dict:
  """A plan file, refused (one line) unless it holds every planned value."""
  try:
    plan = json.loads(Path(path).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"--plan={path}: cannot read the plan: {e}") from None
  missing = [k for k in PLANNED if not isinstance(plan, dict) or k not in plan]
  if missing:
    raise ConfigError(f"--plan={path}: not a plan, it lacks {missing}")
  return plan


def describe(plan: dict) -> str:
  """The plan in a few lines (what the ``plan`` command prints)."""
  mem, budget = plan["memory_bytes"] / memory.GiB, plan["memory_budget_bytes"] / memory.GiB
  seconds = plan["step_seconds"]
  return (
    f"Plan for {plan['dataset']} ({plan['fingerprint']['cases']} cases, {plan['device']}):\n"
    f"  target spacing {plan['target_spacing']} mm, median shape {plan['median_shape']}\n"
    f"  patch {plan['patch_size']}, batch {plan['batch_size']}, features {plan['features']}\n"
    f"  strides {plan['strides']}\n"
    f"  memory {mem:.3f} GiB (XLA's estimate) of a {budget:.3f} GiB budget; expected step "
    + ("not timed" if seconds is None else f"{seconds:.2f} s")
  )


def plan_to_file(config, output: str | Path, **kwargs) -> dict:
  """``python -m resfuse_jax.plan``: plans, writes ``output``, prints the summary."""
  plan = make_plan(config, **kwargs)
  files.write_json(output, plan)
  print(f"{describe(plan)}\n  written to {output}")
  return plan


def plan_and_train(
  config, workdir: str | Path, plan: str, explicit: Collection[str] = (), folds=None, **kw
):
  """``main --plan=auto|FILE``: the plan (W's own when resuming), applied, then training.

  ``folds``: train these folds of a cross-validation (``train.train_folds``), one plan for all.

  ``auto`` plans here, unless W holds a checkpoint and a plan: a resumed run keeps the
  geometry it started with (a new plan could differ with the memory free now).
  """
  w = Workdir(workdir)
  if plan != "auto":
    chosen = read_plan(plan)
  elif w.plan_file.is_file() and w.has_checkpoint():
    chosen = read_plan(w.plan_file)
    logging.info("resuming with the plan in %s", w.plan_file)
  else:
    if jax.process_count() > 1:
      raise ConfigError(
        "--plan=auto plans on one process; with several, plan first (python -m "
        "resfuse_jax.plan --output=plan.json) and pass --plan=plan.json to every process"
      )
    chosen = make_plan(config, explicit=explicit, **kw)
    print(describe(chosen))
  planned, record = apply_plan(config, chosen, explicit)
  validation.check(planned)
  if folds is not None:
    return train.train_folds(planned, workdir, folds, plan_record=record)
  return train.train_and_evaluate(planned, workdir, plan_record=record)
