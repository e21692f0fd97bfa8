"""Evaluates a trained workdir on its validation cases: ``python -m resfuse_jax.evaluate``.

  python -m resfuse_jax.evaluate --workdir=W [--tta] [--step=N] [--nofigures]
  python -m resfuse_jax.evaluate --pool_folds=W0,W1,W2,W3,W4 --output=postprocessing.json
  python -m resfuse_jax.evaluate --workdir=W [--tta]   (W: a cross-validation, main --folds=all)

Writes its own folder ``W/eval-<step>[-tta]/``: ``metrics.csv`` (one row per
case), ``results.json`` (the training contract's keys, plus standard deviations,
for BraTS lesion-wise metrics, and the same after the post-processing chosen on
these cases), ``postprocessing.json``, ``report.md`` (the paper's Table 1 / 2
layout) and ``figures/<case>.png``. Training's ``W/results.json`` and
``W/metrics.csv`` are never touched. For a cross-validation W each finished fold scores its
own validation cases and the pooled out-of-fold results go to ``W/eval-folds[-tta]/``
(``resfuse_jax.evaluation.cross_validation``).
"""

from __future__ import annotations

from absl import app, flags

from resfuse_jax import cli
from resfuse_jax.evaluation import cross_validation, evaluation
from resfuse_jax.workdir import Results, Workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Called by `run`: importing this module defines no flags (CLIs share flag names)."""
  flags.DEFINE_string("workdir", None, "Training workdir (or cross-validation) to evaluate.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("tta", False, "Mirroring test-time augmentation over all axes.")
  flags.DEFINE_bool("figures", True, "Write figures/<case>.png for every validation case.")
  flags.DEFINE_list(
    "pool_folds",
    None,
    "Instead: choose the post-processing on the validation cases of these workdirs together "
    "(the folds of a cross-validation) and write it to --output.",
  )
  flags.DEFINE_string("output", None, "With --pool_folds: the postprocessing.json to write.")
  flags.DEFINE_string(
    "cache_dir",
    None,
    "Preprocessed cache (and regenerated phantom) folder; default $RESFUSE_CACHE or "
    "~/.cache/resfuse_jax. W's config.json never decides where anything is written.",
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.pool_folds:
    if not FLAGS.output:
      raise app.UsageError("--pool_folds needs --output=postprocessing.json")
    record = evaluation.pool_folds(FLAGS.pool_folds, FLAGS.output)
    print(
      f"post-processing chosen on {record['cases']} validation cases of "
      f"{len(FLAGS.pool_folds)} workdirs: {record['describe']}; wrote {FLAGS.output} "
      "(apply it with predict --postprocess=FILE)"
    )
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if Workdir(FLAGS.workdir).is_cross_validation():
    if FLAGS.step is not None:
      raise app.UsageError(
        f"--step names one checkpoint, but {FLAGS.workdir} holds one model per fold (the "
        "latest of each is evaluated); leave --step out, or evaluate one fold's folder"
      )
    out, _ = cross_validation.evaluate_folds(
      FLAGS.workdir, FLAGS.tta, FLAGS.figures, FLAGS.cache_dir
    )
  else:
    out, _ = evaluation.evaluate_workdir(
      FLAGS.workdir, FLAGS.step, FLAGS.tta, FLAGS.figures, FLAGS.cache_dir
    )
  print(Results(out).report_file.read_text())
  print(f"wrote {out}")


def run():
  """Console-script entry point (``resfuse-evaluate``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
