"""Inference-only export of a trained workdir: ``python -m resfuse_jax.export``.

  python -m resfuse_jax.export --workdir=W --output=E [--step=N] [--onnx=auto|yes|no]
  python -m resfuse_jax.predict --model=E --pre=t1n.nii.gz --post=t1c.nii.gz --out=seg.nii.gz

  python -m resfuse_jax.export --workdir=W --output=E [--folds=all|0,1,...]
      (a cross-validation, main --folds=all: one export per fold and the ensemble around
      them; predict --model=E averages the folds)

What ``E/`` holds: ``resfuse_jax.serving.exporting`` (one model),
``resfuse_jax.serving.ensembles`` (a cross-validation).
"""

from __future__ import annotations

from absl import app, flags

from resfuse_jax import checkpointing, cli
from resfuse_jax.serving import agreement, ensembles, exporting
from resfuse_jax.workdir import FOLDS, Workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Called by `run`: importing this module for its functions defines no flags."""
  flags.DEFINE_string("workdir", None, "Training workdir (or cross-validation) to export.")
  flags.DEFINE_string("output", None, "Export folder to create (must not exist).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest; one model only).")
  flags.DEFINE_string(
    "folds",
    None,
    "For a cross-validation W: the folds to pack, 'all' or 0,1,...; default every finished fold.",
  )
  flags.DEFINE_enum(
    "onnx",
    "auto",
    list(exporting.ONNX_MODES),
    "Also write E/model.onnx: auto when the model has an ONNX form and the onnx package is "
    "installed (export.json says why not otherwise); yes: fail if it cannot; no: never.",
  )
  flags.DEFINE_integer(
    "agreement_cases",
    agreement.DEFAULT_CASES,
    "Validation cases (of splits.json, at most eval.max_cases when set) run through OpenVINO "
    "at f32 and bf16 on this machine; export.json records only the agreement numbers, which "
    "predict --precision=bf16 needs. 0: none (bf16 then stays refused).",
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.output:
    raise app.UsageError("--workdir and --output are required")
  if Workdir(FLAGS.workdir).is_cross_validation():
    if FLAGS.step is not None:
      raise app.UsageError(
        f"--step names one checkpoint, but {FLAGS.workdir} holds one model per fold (the "
        "latest of each is exported); leave --step out, or export one fold's folder"
      )
    out = ensembles.export_ensemble(
      FLAGS.workdir, FLAGS.output, FLAGS.folds, FLAGS.onnx, FLAGS.agreement_cases
    )
    print(f"exported {FLAGS.workdir} to {out}: {ensembles.describe(out)}")
    return
  if FLAGS.folds is not None:
    raise app.UsageError(
      f"--folds needs a cross-validation (a workdir with {FOLDS}: main --folds=all); "
      f"{FLAGS.workdir} holds one model"
    )
  out = exporting.export_model(
    FLAGS.workdir, FLAGS.output, FLAGS.step, FLAGS.onnx, FLAGS.agreement_cases
  )
  onnx = checkpointing.export_metadata(out)["onnx"]
  note = "with model.onnx" if onnx["written"] else f"without model.onnx ({onnx['reason']})"
  print(f"exported {FLAGS.workdir} to {out} {note}")  # the bf16 agreement is logged


def run():
  """Console-script entry point (``resfuse-export``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
