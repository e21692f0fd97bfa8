"""Sweeps: the same comparison at every value of one config field (``compare --sweep``)."""

from __future__ import annotations

from pathlib import Path

import ml_collections
from absl import logging

from resfuse_jax import config_lib, files, validation
from resfuse_jax.comparison.markdown import sweep_markdown
from resfuse_jax.comparison.runs import compare
from resfuse_jax.errors import ConfigError
from resfuse_jax.workdir import SWEEP_JSON, SWEEP_MD, SWEEP_PNG, Workdir


def parse_sweep(text: str, config: ml_collections.ConfigDict) -> tuple[str, list]:
  """'data.misregistration_mm=0,1.5,3' -> ('data.misregistration_mm', [0.0, 1.5, 3.0]).

  Values take the type of that field in ``config`` (which must have it).
  """
  key, sep, values = text.partition("=")
  example = "e.g. --sweep=data.misregistration_mm=0,1.5,3"
  if not sep or not key or not values:
    raise ConfigError(f"--sweep={text}: expected <config field>=<v1>,<v2>,...; {example}")
  try:
    current = config_lib.get_path(config, key)
  except KeyError:
    raise ConfigError(f"--sweep={text}: the config has no field {key}; {example}") from None
  if isinstance(current, bool) or not isinstance(current, int | float | str):
    raise ConfigError(f"--sweep={text}: {key} is {current!r}; only numbers and strings sweep")
  try:
    parsed = [type(current)(v.strip()) for v in values.split(",")]
  except ValueError:
    raise ConfigError(
      f"--sweep={text}: every value must be a {type(current).__name__} like {key}={current!r}"
    ) from None
  if len(set(parsed)) != len(parsed):
    raise ConfigError(f"--sweep={text}: a value is repeated")
  return key, parsed


def sweep_folder(key: str, value, default) -> str:
  """``W/<key>=<value>``; the config's own value runs in ``W/default``, shared by every sweep."""
  if value == default:
    return "default"
  return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def sweep(
  config_spec: str,
  names: list[str],
  workdir: str | Path,
  sweep_text: str,
  overrides: dict | None = None,
  reference: str = "resfuse",
  seeds: list[int] | None = None,
  folds: list[int] | None = None,
) -> dict:
  """One ``compare`` per value (finished runs reused); the sweep's json, md and png across them."""
  w = Workdir(workdir)
  overrides = dict(overrides or {})
  config = config_lib.load(config_spec, overrides)
  key, values = parse_sweep(sweep_text, config)
  if key in overrides:
    raise ConfigError(f"--sweep={sweep_text} and --config.{key}: sweep the field or set it")
  default = config_lib.get_path(config, key)
  for value in values:  # every value's settings, before the first run
    validation.check(
      config_lib.load(config_spec, overrides | {key: value}), f"--sweep {key}={value}"
    )
  points = []
  for value in values:
    folder = sweep_folder(key, value, default)
    logging.info("##### %s = %s (%s) #####", key, value, w.path / folder)
    out = compare(
      config_spec, names, w.path / folder, overrides | {key: value}, reference, seeds, folds
    )
    points.append({"value": value, "folder": folder, "comparison": out})
  result = sweep_record(key, values, points)
  with w.lock("sweep"):
    files.write_json(w.sweep_file(SWEEP_JSON), result)
    files.write_text(w.sweep_file(SWEEP_MD), sweep_markdown(result))
    from resfuse_jax import visualize  # matplotlib only for the figure

    visualize.sweep_figure(w.sweep_file(SWEEP_PNG), result)
  return result


def _model_series(points: list[dict], cols: list[str], regions: list[str]) -> dict:
  """Per model, per value: Dice per region, the paired tests, the W_l norms."""
  models = {}
  for point in points:
    for entry in point["comparison"]["models"]:
      m = models.setdefault(entry["model"], {"dice": {r: [] for r in cols}, "paired": {}})
      for r in cols:
        stat = entry["dice"][r]
        m["dice"][r].append(
          {"mean": stat["mean"], "seed_std": stat["seed_std"], "seed_means": stat["seed_means"]}
        )
      for r in regions:
        m["paired"].setdefault(r, []).append(entry["paired_vs_reference"]["dice"][r])
      if "fusion_weight_norms" in entry:
        norms = m.setdefault("fusion_weight_norms", {})
        for level, stat in entry["fusion_weight_norms"].items():
          norms.setdefault(level, []).append(stat)
  return models


def sweep_record(key: str, values: list, points: list[dict]) -> dict:
  """Per model and value: Dice per region (case mean, seed means), paired test, W_l norms."""
  first = points[0]["comparison"]
  regions = first["regions"]
  cols = regions + ["mean"] if len(regions) > 1 else regions
  return {
    "knob": key,
    "values": values,
    "folders": [p["folder"] for p in points],
    "dataset": first["dataset"],
    "seeds": first["seeds"],
    "steps": first["steps"],
    "cases": first["cases"],
    "regions": regions,
    "reference": first["reference"],
    "models": _model_series(points, cols, regions),
  }
