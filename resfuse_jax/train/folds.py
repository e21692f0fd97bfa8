"""Cross-validation: ``main --folds=all`` trains every fold into ``W/fold_<k>/``.

Each fold is an ordinary run (``train_and_evaluate`` on its own workdir, resumable
and locked on its own), so folds may also train as separate jobs (``--folds=0``,
``--folds=1``, ... on the same W) and a rerun skips the folds already finished. W
holds the shared config, ``folds.json`` and the pooled out-of-fold results
(``evaluation.pooling``), rewritten each time a fold finishes.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from absl import logging

from resfuse_jax import files
from resfuse_jax.evaluation import pooling
from resfuse_jax.task import Task
from resfuse_jax.train.run import train_and_evaluate
from resfuse_jax.workdir import Workdir


def shared_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config every fold shares: the final validation scores every case of its fold.

  ``eval.max_cases`` (a cap for quick runs) would leave cases out of the out-of-fold
  pool, which must score every case once.
  """
  shared = ml_collections.ConfigDict(config.to_dict())
  if shared.eval.max_cases:
    logging.info("cross-validation: eval.max_cases ignored, every case is scored")
    shared.eval.max_cases = 0
  return shared


def fold_config(shared: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
  fold = ml_collections.ConfigDict(shared.to_dict())
  fold.data.fold = int(k)
  return fold


def train_folds(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  folds: list[int],
  plan_record: dict | None = None,
) -> dict:
  """Trains (or resumes, or skips when finished) each of ``folds``; returns W's pooled results.

  W's lock is held only while W's own files change (its claim, and the pooling), so
  other folds of the same W may train in parallel jobs. Every fold holds its own lock.
  """
  shared = shared_config(config)
  w = Workdir(files.make_dirs(workdir))
  if jax.process_index() == 0:
    with w.lock("cross-validation"):
      w.claim(shared, cross_validation=True)
      known = w.read_folds()["folds"] if w.is_cross_validation() else []
      w.write_folds(shared.data.num_folds, sorted(set(known) | set(folds)))
      if plan_record is not None:
        w.write_plan(plan_record)
  for k in folds:
    member, fold = w.fold(k), fold_config(shared, k)
    if member.finished_run(fold) is not None:
      logging.info("fold %d: %s holds it finished, not retrained", k, member.path)
      continue
    logging.info("fold %d of %d: training into %s", k, shared.data.num_folds, member.path)
    train_and_evaluate(fold, member.path)
  return pool(w, shared)


def pool(w: Workdir, shared: ml_collections.ConfigDict) -> dict:
  """W's results from every finished fold (process 0 writes them; the others read nothing)."""
  if jax.process_index() != 0:
    return {}
  with w.lock("cross-validation"):
    finished = w.finished_folds()
    results = pooling.pool_out_of_fold(w, w, Task.from_config(shared), finished)
  cv = results["cross_validation"]
  print(
    f"Out-of-fold Dice over {results['cases']} cases of folds "
    f"{', '.join(map(str, cv['folds']))} ({cv['num_folds']}-fold cross-validation"
    f"{'' if cv['complete'] else ', incomplete'}): "
    + ", ".join(f"{r} {v:.4f}" for r, v in results["dice"].items())
  )
  return results
