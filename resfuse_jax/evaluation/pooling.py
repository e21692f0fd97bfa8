"""The pooled out-of-fold results of a cross-validation (``main --folds``).

Every case is scored once, by the fold that did not train on it (its rows in that
fold's ``metrics.csv``), and the post-processing is chosen once, on every fold's saved
validation masks together, as nnU-Net chooses it on its pooled cross-validation: a
choice made on one fold's fifth of the cases is noisier, and an ensemble of the folds
needs one rule, not five.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from resfuse_jax import files
from resfuse_jax.errors import CheckpointError
from resfuse_jax.evaluation import metrics, postprocess_selection
from resfuse_jax.evaluation.finalize import results_record
from resfuse_jax.inference import postprocess
from resfuse_jax.task import Task
from resfuse_jax.workdir import Results, Workdir

FOLD_KEYS = ("steps", "cases", "dice", "recall", "precision", "hd95", "lesion_dice")


def pooled_rows(folds: list[Workdir], task: Task) -> metrics.RegionMetrics:
  """Every fold's per-case rows (its ``metrics.csv``) as one set of out-of-fold metrics."""
  acc = metrics.RegionMetrics(task.region_names, lesion_wise=task.dataset.brats_like)
  for fold in folds:
    acc.rows += metrics.read_csv(fold.metrics_file)
  ids = [row["case"] for row in acc.rows]
  if len(ids) != len(set(ids)):
    twice = sorted({i for i in ids if ids.count(i) > 1})
    raise CheckpointError(f"cases scored by two folds: {twice[:5]}; the folds' splits disagree")
  return acc


def pool_out_of_fold(
  w: Workdir, out: Results, task: Task, folds: list[int], extra: dict | None = None
) -> dict:
  """Writes ``out``'s results.json, metrics CSVs and postprocessing.json from W's folds.

  ``folds``: the finished folds to pool (``W/fold_<k>/`` each holding its final
  validation's ``metrics.csv`` and ``validation_masks.npz``). ``results.json`` says
  which folds it pooled and whether they are all of ``data.num_folds``.
  """
  members = [w.fold(k) for k in folds]
  before = pooled_rows(members, task)
  cases = postprocess_selection.pooled_masks([m.path for m in members])
  names, brats_like = task.region_names, task.dataset.brats_like
  record = postprocess_selection.determine(cases, names, brats_like)
  record["folds"] = list(folds)
  rules = postprocess.rules_from_record(record, names, str(out.path))
  after = postprocess_selection.evaluate_rules(cases, rules, names, lesion_wise=brats_like)
  per_fold = {str(k): _fold_summary(m) for k, m in zip(folds, members)}
  num_folds = int(task.config.data.num_folds)
  steps = min(f["steps"] for f in per_fold.values())
  params = max(m.read_results()["params"] for m in members)
  results = {
    **results_record(task.config, steps, params, before),
    "std": before.std(),
    "cross_validation": {
      "num_folds": num_folds,
      "folds": list(folds),
      "complete": sorted(folds) == list(range(num_folds)),
    },
    "folds": per_fold,
    "fold_mean_dice": _mean_over_folds(per_fold, task.region_names),
    "postprocessed": {**after.summary(), "std": after.std(), "rules": record["describe"]},
    **(extra or {}),
  }
  logging.info(
    "pooled %d out-of-fold cases of folds %s; post-processing: %s",
    len(before.rows), folds, record["describe"],
  )  # fmt: skip
  out.make()
  files.write_json(out.postprocessing_file, record)
  before.write_csv(out.metrics_file)
  after.write_csv(out.metrics_postprocessed_file)
  out.write_results(results)  # last: a folder that has it is complete
  return results


def _fold_summary(fold: Workdir) -> dict:
  results = fold.read_results()
  return {k: results[k] for k in FOLD_KEYS if k in results}


def _mean_over_folds(per_fold: dict, regions: list[str]) -> dict:
  """Each fold's mean Dice averaged over folds (nnU-Net's summary; the pooled mean weighs
  cases, this weighs folds)."""
  return {r: float(np.mean([f["dice"][r] for f in per_fold.values()])) for r in [*regions, "mean"]}
