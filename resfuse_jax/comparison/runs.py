"""``compare``: train (or reuse) every model on the same data, then test them per case.

A model's run is reused when its workdir holds the same run finished
(``workdir.Workdir.finished_run``, the rule training's resume shares); otherwise it
trains or resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging
from scipy import stats

from resfuse_jax import config_lib, files, train, validation
from resfuse_jax.comparison.markdown import comparison_markdown
from resfuse_jax.errors import DataError
from resfuse_jax.evaluation import metrics
from resfuse_jax.task import Task
from resfuse_jax.workdir import Workdir

METRICS = ("dice", "recall")
EXTRA_METRICS = ("lesion_dice", "pp_dice", "pp_lesion_dice")  # when every run has them


def run_model(
  config: ml_collections.ConfigDict, workdir: Path, folds: list[int] | None = None
) -> tuple[dict, list[dict]]:
  """Trains (or resumes) one model unless its workdir already holds the same run finished.

  ``folds``: a cross-validation of these folds in ``workdir`` (``train.train_folds``),
  whose rows are the pooled out-of-fold cases, each scored by the fold that held it out.
  Returns its results and per-case rows (with ``pp_`` columns after post-processing).
  """
  w = Workdir(workdir)
  if folds is not None:
    finished = w.finished_run(train.folds.shared_config(config))
    if finished is not None and finished["cross_validation"]["folds"] == sorted(folds):
      logging.info("%s: finished cross-validation found, not retrained", workdir)
    else:
      train.train_folds(config, w.path, folds)
  elif w.finished_run(config) is not None:
    logging.info("%s: finished run found, not retrained", workdir)
  else:
    train.train_and_evaluate(config, w.path)
  rows = metrics.read_csv(w.metrics_file)
  if w.metrics_postprocessed_file.exists():  # the same cases after the chosen post-processing
    after = {row["case"]: row for row in metrics.read_csv(w.metrics_postprocessed_file)}
    rows = [
      row | {f"pp_{k}": v for k, v in after[row["case"]].items() if k != "case"} for row in rows
    ]
  return w.read_results(), rows


def paired_test(ours: list[float], reference: list[float]) -> dict:
  """Wilcoxon signed-rank test of per-case differences; p = 1 when no case differs."""
  diff = np.asarray(ours) - np.asarray(reference)
  if not np.any(diff):
    p = 1.0
  else:
    p = float(stats.wilcoxon(diff, zero_method="wilcox").pvalue)
  return {"mean_diff": float(np.mean(diff)), "p_value": p, "test": "wilcoxon signed-rank"}


def summarize(
  name: str, results: dict, per_seed: list[list[dict]], regions: list[str], flops: float
) -> dict:
  """Per metric and region: mean ± std over cases of the seed-averaged per-case value."""
  entry = {"model": name, "params": results["params"], "train_flops_per_step": flops}
  present = [
    m for m in EXTRA_METRICS if all(f"{m}_{regions[0]}" in row for rows in per_seed for row in rows)
  ]
  for m in (*METRICS, *present):
    # [seeds, cases] per region, plus the per-case mean over regions
    values = {
      r: np.array([[row[f"{m}_{r}"] for row in rows] for rows in per_seed]) for r in regions
    }
    values["mean"] = np.mean([values[r] for r in regions], axis=0)
    entry[m] = {
      r: {
        "mean": float(v.mean()),
        "std": float(np.std(v.mean(axis=0))),
        "seed_std": float(np.std(v.mean(axis=1))),
        "seed_means": [float(x) for x in v.mean(axis=1)],
      }
      for r, v in values.items()
    }
  return entry


def seed_averaged(per_seed: list[list[dict]], key: str) -> list[float]:
  return list(np.mean([[row[key] for row in rows] for rows in per_seed], axis=0))


def compare(
  config_spec: str,
  names: list[str],
  workdir: str | Path,
  overrides: dict | None = None,
  reference: str = "resfuse",
  seeds: list[int] | None = None,
  folds: list[int] | None = None,
) -> dict:
  """Trains (or reuses) every model of ``names`` for ``config_spec`` ('configs/x.py[:args]').

  ``folds``: each model (and seed) is a cross-validation of these folds; the cases
  compared are then every fold's held-out cases, pooled.
  """
  w = Workdir(workdir)
  configs = {n: config_lib.load(config_lib.with_model(config_spec, n), overrides) for n in names}
  for name, config in configs.items():  # every model's settings, before the first run
    validation.check(config, where=f"the config of --models={name}")
  with w.lock("comparison"):
    runs = {
      name: _train_seeds(config, w.path / name, seeds, folds) for name, config in configs.items()
    }
    out = _comparison_record(runs, w.path, reference, seeds, folds)
    files.write_text(w.comparison_json, json.dumps(out, indent=2))
    files.write_text(w.comparison_md, comparison_markdown(out))
  return out


def _train_seeds(config, run_dir: Path, seeds, folds=None) -> tuple:
  """(config, results per seed, {case: row} per seed); seeds train in ``run_dir/seed<k>``."""
  per_seed, per_seed_results = [], []
  for seed in seeds or [None]:
    run_config, seed_dir = config, run_dir
    if seed is not None:
      run_config = ml_collections.ConfigDict(config.to_dict())
      run_config.seed = seed
      seed_dir = run_dir / f"seed{seed}"
    logging.info("=== %s%s ===", run_dir.name, "" if seed is None else f", seed {seed}")
    results, rows = run_model(run_config, seed_dir, folds)
    per_seed.append({row["case"]: row for row in rows})
    per_seed_results.append(results)
  return config, per_seed_results, per_seed


def _comparison_record(runs: dict, workdir: Path, reference: str, seeds, folds=None) -> dict:
  """``comparison.json``: the setting, then one entry per model (``_model_entry``)."""
  names = list(runs)
  first = runs[names[0]][0]
  regions = Task.from_config(first).region_names
  cases = sorted(runs[names[0]][2][0])
  for name, (_, _, per_seed) in runs.items():
    if any(sorted(rows) != cases for rows in per_seed):
      raise DataError(f"{workdir / name} was validated on other cases than {names[0]}")
  ordered = {
    n: [[rows[c] for c in cases] for rows in per_seed] for n, (_, _, per_seed) in runs.items()
  }
  ref = reference if reference in runs else names[0]
  return {
    "dataset": first.data.name,
    "fold": "out-of-fold" if folds else first.data.fold,
    "folds": list(folds) if folds else None,
    "num_folds": first.data.num_folds,
    "seeds": list(seeds) if seeds else [first.seed],
    "steps": first.train.steps,
    "batch_size": first.train.batch_size,
    "patch_size": list(first.data.patch_size),
    "cases": len(cases),
    "regions": regions,
    "reference": ref,
    "models": [
      _model_entry(name, run, ordered[name], ordered[ref], regions) for name, run in runs.items()
    ],
  }


def _model_entry(name: str, run: tuple, ordered, reference_rows, regions) -> dict:
  """Cost, metrics, W_l norms (ResFuse) and the paired tests against the reference."""
  config, per_seed_results, _ = run
  flops = train.train_step_flops(config)
  entry = summarize(name, per_seed_results[-1], ordered, regions, flops)
  norms = [r.get("fusion_weight_norms") for r in per_seed_results]
  if all(norms):  # ResFuse's learned W_l: mean and spread over seeds, per level
    entry["fusion_weight_norms"] = {
      level: {
        "mean": float(np.mean([n[level] for n in norms])),
        "seed_std": float(np.std([n[level] for n in norms])),
      }
      for level in norms[0]
    }
  if all("folds" in r for r in per_seed_results):  # a cross-validation: each fold's own means
    entry["fold_dice"] = [
      {k: f["dice"] for k, f in r["folds"].items()} for r in per_seed_results
    ]  # per seed, then per fold: how much the folds differ
  entry["paired_vs_reference"] = {
    m: {
      r: paired_test(seed_averaged(ordered, f"{m}_{r}"), seed_averaged(reference_rows, f"{m}_{r}"))
      for r in regions
    }
    for m in METRICS
  }
  return entry
