"""Evaluates a trained workdir on its validation cases: ``python -m resfuse_jax.evaluate``.

  python -m resfuse_jax.evaluate --workdir=W [--tta] [--step=N] [--nofigures]

Writes its own folder ``W/eval-<step>[-tta]/``: ``metrics.csv`` (one row per
case), ``results.json`` (the training contract's keys, plus standard deviations
and, for BraTS, lesion-wise metrics), ``report.md`` (the paper's Table 1 / 2
layout) and ``figures/<case>.png``. Training's ``W/results.json`` and
``W/metrics.csv`` are never touched.
"""

from __future__ import annotations

from absl import app, flags

from resfuse_jax import cli
from resfuse_jax.eval import evaluation

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Called by `run`: importing this module defines no flags (CLIs share flag names)."""
  flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("tta", False, "Mirroring test-time augmentation over all axes.")
  flags.DEFINE_bool("figures", True, "Write figures/<case>.png for every validation case.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  out, _ = evaluation.evaluate_workdir(FLAGS.workdir, FLAGS.step, FLAGS.tta, FLAGS.figures)
  print((out / "report.md").read_text())
  print(f"wrote {out}")


def run():
  """Console-script entry point (``resfuse-evaluate``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
