"""The one validation of a resolved config, run by every command before anything is written.

``check(config)`` raises ``ConfigError`` listing every problem, one line each, naming the
key, its value and what is allowed: ``main`` and ``compare`` check the config they train
with, ``preprocess`` the config it caches for, and ``evaluate``, ``predict`` and
``export`` the ``config.json`` they read (``workdir.read_config``). A problem found here
would otherwise surface late (a ZeroDivisionError at the first logging step, a raw Grain
error, a case blamed for a bad spacing) or not at all (a threshold list one region short).

``unknown_key(config, key)`` words a misspelled ``--config.a.b`` with the nearest valid key.
"""

from __future__ import annotations

import difflib
import math
from numbers import Integral, Real

from resfuse_jax import config_lib, data
from resfuse_jax.errors import ConfigError

AXES = ("x, right-left", "y, back-front", "z, foot-head")  # cached cases are canonical RAS

# key -> what the count means
_POSITIVE_INTEGERS = {
  "train.steps": "the number of training steps",
  "train.batch_size": "the global batch, in patches",
  "train.grad_accum": "microbatches per step",
  "train.log_every": "log every N steps",
  "eval.every_steps": "validate every N steps",
  "checkpoint.every_steps": "save every N steps",
  "checkpoint.keep": "checkpoints kept",
  "data.num_folds": "folds of the cross-validation",
}
# model.name of every variant: the models registry's names (without importing model code,
# which preprocess never loads; tests/test_validation.py checks the two agree)
MODEL_NAMES = sorted({name for name, _ in config_lib.VARIANTS.values()})
_NON_NEGATIVE_INTEGERS = ("train.warmup_steps", "eval.batch_size", "eval.max_cases")
_CHOICES = {
  "model.fusion": ("identity", "conv", "gate"),
  "data.normalization": ("zscore", "joint"),
  "data.on_bad_case": ("error", "skip"),
  "data.resident": ("auto", "device", "host"),
  "data.resident_dtype": ("float32", "bfloat16"),
  "data.resident_layout": ("auto", "replicated", "sharded"),
  "train.optimizer": ("adamw", "sgd"),
}


def _is_int(value) -> bool:
  return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _get(config, key: str):
  try:
    return config_lib.get_path(config, key)
  except KeyError:
    return None


def _counts(config) -> list[str]:
  problems = []
  for key, meaning in _POSITIVE_INTEGERS.items():
    value = _get(config, key)
    if value is not None and not (_is_int(value) and value >= 1):
      problems.append(f"config.{key}={value!r}: must be an integer >= 1 ({meaning})")
  for key in _NON_NEGATIVE_INTEGERS:
    value = _get(config, key)
    if value is not None and not (_is_int(value) and value >= 0):
      problems.append(f"config.{key}={value!r}: must be an integer >= 0 (0 = the default)")
  batch, accum = _get(config, "train.batch_size"), _get(config, "train.grad_accum")
  if _is_int(batch) and _is_int(accum) and batch >= 1 and accum >= 1 and batch % accum:
    problems.append(
      f"config.train.grad_accum={accum}: must divide config.train.batch_size={batch} "
      f"(each step splits the batch into grad_accum equal microbatches), e.g. "
      f"{', '.join(str(d) for d in range(1, batch + 1) if batch % d == 0)}"
    )
  fold, folds = _get(config, "data.fold"), _get(config, "data.num_folds")
  if _is_int(folds) and folds >= 1 and not (_is_int(fold) and 0 <= fold < folds):
    problems.append(f"config.data.fold={fold!r}: must be 0 .. {folds - 1} (data.num_folds={folds})")
  return problems


def _geometry(config) -> list[str]:
  problems = []
  patch = _get(config, "data.patch_size")
  if patch is not None and not (
    isinstance(patch, (tuple, list))
    and len(patch) == 3
    and all(_is_int(s) and s >= 1 for s in patch)
  ):
    problems.append(
      f"config.data.patch_size={patch!r}: must be 3 positive integers (depth, height, width), "
      "e.g. (128, 128, 128)"
    )
  spacing = _get(config, "data.target_spacing")
  if spacing is not None and not (
    isinstance(spacing, (tuple, list))
    and len(spacing) == 3
    and all(_is_real(s) and s > 0 for s in spacing)
  ):
    problems.append(
      f"config.data.target_spacing={spacing!r}: must be None (keep each scan's spacing) or "
      "3 positive numbers in mm, e.g. (1.0, 1.0, 1.0)"
    )
  overlap = _get(config, "eval.overlap")
  if overlap is not None and not (_is_real(overlap) and 0 <= overlap < 1):
    problems.append(f"config.eval.overlap={overlap!r}: must be a number in [0, 1)")
  share = _get(config, "data.resident_memory_fraction")
  if share is not None and not (_is_real(share) and 0 < share <= 1):
    problems.append(f"config.data.resident_memory_fraction={share!r}: must be a number in (0, 1]")
  lr = _get(config, "train.lr")
  if lr is not None and not (_is_real(lr) and lr > 0):
    problems.append(f"config.train.lr={lr!r}: must be a number > 0")
  return problems


def _pooling(config) -> list[str]:
  """model.strides well formed, and a patch each model level can halve where it pools."""
  model, patch = _get(config, "model"), _get(config, "data.patch_size")
  features = _get(config, "model.features")
  if model is None or not isinstance(features, (tuple, list)) or not features:
    return []
  strides = model.get("strides")
  try:
    factors = config_lib.downsampling(model)
  except ValueError as e:
    return [f"config.model.strides={strides!r}: {e}"]
  if not (isinstance(patch, (tuple, list)) and len(patch) == 3 and all(map(_is_int, patch))):
    return []  # named by _geometry
  bad = [a for a in range(3) if patch[a] % factors[a]]
  if not bad:
    return []
  fixed = tuple(max(f, p // f * f) for p, f in zip(patch, factors))
  return [
    f"config.data.patch_size={tuple(patch)!r}: each axis must be a multiple of the model's "
    f"downsampling there, {factors} (the product of model.strides={strides!r} per axis; None "
    f"halves every axis at each of the {len(features) - 1} pooling levels); e.g. {fixed}"
  ]


def _names(config) -> list[str]:
  problems = []
  variant, name = _get(config, "model.variant"), _get(config, "model.name")
  if variant is not None and variant not in config_lib.VARIANTS:
    problems.append(_choice("model.variant", variant, config_lib.MODELS))
  if name is not None and name not in MODEL_NAMES:
    problems.append(_choice("model.name", name, MODEL_NAMES))
  dataset = _get(config, "data.name")
  if dataset is not None and dataset not in data.names():
    problems.append(_choice("data.name", dataset, data.names()))
  for key, allowed in _CHOICES.items():
    value = _get(config, key)
    if value is not None and value not in allowed:
      problems.append(_choice(key, value, allowed))
  return problems


def _choice(key: str, value, allowed) -> str:
  near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
  hint = f" (did you mean {near[0]!r}?)" if near else ""
  return f"config.{key}={value!r}: unknown{hint}; choose from {', '.join(map(str, allowed))}"


def _thresholds(config) -> list[str]:
  thresholds, dataset = _get(config, "eval.thresholds"), _get(config, "data.name")
  if thresholds is None:
    return []
  if not isinstance(thresholds, (tuple, list)) or not all(
    _is_real(t) and 0 < t < 1 for t in thresholds
  ):
    return [f"config.eval.thresholds={thresholds!r}: must be numbers in (0, 1), one per region"]
  if dataset not in data.names():
    return []  # named by _names
  regions = data.get_dataset(dataset).region_names
  if len(thresholds) != len(regions):
    return [
      f"config.eval.thresholds={tuple(thresholds)!r}: {len(thresholds)} value(s) for "
      f"{len(regions)} region(s) of data.name={dataset!r} ({', '.join(regions)}); give one per "
      "region, in that order, or None for 0.5 each"
    ]
  return []


def problems(config) -> list[str]:
  """Every problem of ``config``, one line each (empty when it is valid)."""
  return (
    _names(config) + _counts(config) + _geometry(config) + _pooling(config) + _thresholds(config)
  )


def check(config, where: str = "") -> None:
  """Raises ``ConfigError`` with one line per problem; ``where`` names a config file read."""
  found = problems(config)
  if found:
    source = f" in {where}" if where else ""
    raise ConfigError(
      f"{len(found)} invalid setting(s){source}:\n" + "\n".join(f"  {p}" for p in found)
    )


def check_against(config, fingerprint) -> None:
  """The settings that only the data can judge (``data.fingerprint.Fingerprint``).

  A patch longer on some axis than every case (after cropping and resampling to
  ``data.target_spacing``) is mostly zero padding: refused, with the longest extent.
  """
  patch = tuple(config.data.patch_size)
  extents = fingerprint.largest_extent()
  too_long = [
    f"axis {axis} ({AXES[axis]}) is {p} voxels, but the longest of the "
    f"{len(fingerprint.case_ids)} cases there is {n} (case {cid})"
    for axis, (p, (n, cid)) in enumerate(zip(patch, extents))
    if p > n
  ]
  if too_long:
    spacing = config.data.get("target_spacing")
    raise ConfigError(
      f"config.data.patch_size={patch!r} does not fit the data after cropping and resampling "
      f"(data.target_spacing={spacing!r}): {'; '.join(too_long)}; use a patch of at most "
      f"{tuple(min(p, n) for p, (n, _) in zip(patch, extents))} (each a multiple of the "
      "model's downsampling factor) or a finer data.target_spacing"
    )


def dotted_keys(config, prefix: str = "") -> list[str]:
  """Every leaf key of ``config`` as ``section.key``."""
  out = []
  for key in config.keys():
    value = config[key]
    if hasattr(value, "keys"):
      out += dotted_keys(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def unknown_key(config, key: str) -> str:
  """``'train.stpes'`` -> a line naming it and the nearest valid key."""
  valid = dotted_keys(config)
  near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
  if not near:  # a misspelled section: match the leaf within any section
    leaf = key.rsplit(".", 1)[-1]
    near = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:1]
  hint = f"; did you mean --config.{near[0]}?" if near else ""
  return f"--config.{key}: no such config key{hint} (every key and its default: resfuse_jax/config_lib.py)"
