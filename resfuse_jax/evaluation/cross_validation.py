"""``evaluate --workdir=W`` of a cross-validation: each fold scores only the cases it never saw.

Every finished fold's model is evaluated on its own validation cases
(``W/fold_<k>/splits.json``), so each case is scored once, by the one model that did not
train on it, and the folds' rows pool into out-of-fold results. Writes
``W/eval-folds[-tta]/`` (``Workdir.folds_eval_dir``):

- ``fold_<k>/``: what ``evaluate --workdir=W/fold_<k>`` computes (results, per-case rows,
  the post-processing chosen on that fold's cases) and the fold's masks;
- at the top, pooled from those exactly as training pools W (``pooling.pool_out_of_fold``,
  so both read alike): the out-of-fold results (``folds``: each fold's summary), rows,
  the post-processing chosen on the pooled cases; then ``report.md`` and ``figures/``.

Training's files, W's and each fold's, are never touched.
"""

from __future__ import annotations

from pathlib import Path

from resfuse_jax import files
from resfuse_jax.errors import CheckpointError
from resfuse_jax.evaluation import pooling, report
from resfuse_jax.evaluation.evaluation import validate_predictor
from resfuse_jax.evaluation.finalize import finalize
from resfuse_jax.inference import ensemble
from resfuse_jax.inference.predictor import Predictor
from resfuse_jax.task import Task
from resfuse_jax.workdir import FOLD_PREFIX, Workdir


def _refuse_repeats(rows: list[dict], fold: int, seen: dict[str, int]) -> None:
  """Each case is scored by one fold only: a case validated by two folds is refused."""
  for row in rows:
    if row["case"] in seen:
      raise CheckpointError(
        f"case {row['case']} is a validation case of folds {seen[row['case']]} and {fold}: "
        "the folds' splits overlap, so their results cannot be pooled"
      )
    seen[row["case"]] = fold


def _labelled(results: dict, label: str) -> dict:
  return {**results, "model": f"{results['model']} {label}"}


def evaluate_folds(
  workdir: str | Path,
  tta: bool = False,
  figures: bool = True,
  cache_dir: str | Path | None = None,
) -> tuple[Path, dict]:
  """Evaluates every finished fold of the cross-validation ``workdir`` on its validation
  cases and pools them; returns (``W/eval-folds[-tta]/``, the pooled results)."""
  w = Workdir(workdir)
  folds = w.finished_folds()
  if not folds:
    raise CheckpointError(
      f"{w.path} holds no finished fold (no {FOLD_PREFIX}<k>/results.json): nothing to evaluate"
    )
  config = w.read_config()
  ensemble.check_agreement(config, [(k, w.fold(k).path) for k in folds], w.path)
  task = Task.from_config(config)
  out = w.folds_eval_dir(tta)
  seen: dict[str, int] = {}
  per_fold: dict[int, dict] = {}
  for k in folds:
    fold = w.fold(k)
    predictor = Predictor.load(fold.path)
    val_ids = fold.read_splits()["val"]
    acc, collected = validate_predictor(
      predictor, val_ids, tta, out.figures_dir if figures else None, cache_dir
    )
    _refuse_repeats(acc.rows, k, seen)
    own = Workdir(out.path).fold(k).make()
    per_fold[k] = finalize(
      own, predictor.task, predictor.step, predictor.num_params, acc, collected,
      extra={"tta": tta, "fold": k}, keep_masks=True,
    )  # fmt: skip
  results = pooling.pool_out_of_fold(Workdir(out.path), out, task, folds, extra={"tta": tta})
  table = [_labelled(results, f"(out-of-fold, {len(folds)} folds)")]
  table += [_labelled(r, f"(fold {k})") for k, r in per_fold.items()]
  files.write_text(out.report_file, report.results_markdown(table, task.region_names))
  return out.path, results
