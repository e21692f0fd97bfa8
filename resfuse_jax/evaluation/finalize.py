"""The one finalize step of a validation: results, per-case rows, the post-processing choice.

Training (into W) and ``evaluate`` (into ``W/eval-<step>[-tta]/``) both end with
``finalize``: it chooses the post-processing on the validation cases' masks, scores
it, and writes ``results.json``, ``metrics.csv``, ``metrics_postprocessed.csv`` and
``postprocessing.json`` into the folder ``workdir.Results`` names.
"""

from __future__ import annotations

from absl import logging

from resfuse_jax import files
from resfuse_jax.evaluation import metrics, postprocess_selection
from resfuse_jax.inference import postprocess
from resfuse_jax.task import Task
from resfuse_jax.workdir import Results


def results_record(config, step: int, num_params: int, acc: metrics.RegionMetrics) -> dict:
  """``results.json``'s contract keys: model, variant, dataset, steps, params, metrics, cases."""
  return {
    "model": config.model.name,
    "variant": config.model.variant,
    "dataset": config.data.name,
    "steps": int(step),
    "params": int(num_params),
    **acc.summary(),
    "cases": len(acc.rows),
  }


def finalize(
  folder: Results,
  task: Task,
  step: int,
  num_params: int,
  val: metrics.RegionMetrics,
  cases: list[postprocess_selection.CaseMasks],
  *,
  extra: dict | None = None,
  keep_masks: bool = False,
) -> dict:
  """Chooses the post-processing on ``cases`` and writes the folder's results; returns them.

  ``val``: the metrics before post-processing; ``cases``: every validation case's masks on
  the grid ``val`` was scored on (``evaluate_cases(collect=...)``: each case's original
  grid). ``extra``: more keys for ``results.json``; ``keep_masks`` also saves the masks (for pooling the folds of a cross-validation).
  ``results.json`` is written last: a folder that has it is complete.
  """
  names, brats_like = task.region_names, task.dataset.brats_like
  if keep_masks:
    postprocess_selection.save_masks(folder.validation_masks_file, cases)
  record = postprocess_selection.determine(cases, names, brats_like)
  rules = postprocess.rules_from_record(record, names, str(folder.path))
  after = postprocess_selection.evaluate_rules(cases, rules, names, lesion_wise=brats_like)
  logging.info("post-processing chosen on %d validation cases: %s", len(cases), record["describe"])
  results = {
    **results_record(task.config, step, num_params, val),
    "std": val.std(),
    **(extra or {}),
    "postprocessed": {**after.summary(), "std": after.std(), "rules": record["describe"]},
  }
  files.write_json(folder.postprocessing_file, record)
  val.write_csv(folder.metrics_file)
  after.write_csv(folder.metrics_postprocessed_file)
  folder.write_results(results)
  return results
