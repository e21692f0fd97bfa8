"""Label maps for new scans, written in each input's own grid, affine and orientation.

  python -m resfuse_jax.predict --workdir=W --pre=t1n.nii.gz --post=t1c.nii.gz --out=seg.nii.gz
  python -m resfuse_jax.predict --workdir=W --input=DIR --output=OUT [--tta] [--probabilities]
  python -m resfuse_jax.predict --model=E ...   (an export: python -m resfuse_jax.export)

``--input`` is a folder in the layout of the training dataset (BraTS 2023 case folders, or the
MAMA-MIA ``images/`` tree) or a CSV manifest; segmentations are not needed. BraTS outputs are
named ``BraTS-GLI-XXXXX-YYY.nii.gz`` as the challenge expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from absl import app, flags, logging

from resfuse_jax import cli, data, exported
from resfuse_jax.data import brats, breast, manifest
from resfuse_jax.predictor import Predictor

FLAGS = flags.FLAGS


def find_input_cases(path: Path, config: Any) -> list[data.CaseFiles]:
  """Cases of a prediction input: a manifest CSV, or a folder in the training layout."""
  if path.suffix.lower() == ".csv":
    return manifest.find_cases(path, require_label=False)
  if config.data.name == "breast":
    return breast.find_cases(path, config.data.get("post_phase", 1), require_label=False)
  if config.data.name in ("brats", "phantom"):
    return brats.find_cases(path, require_label=False)
  raise data.DataError(
    f"--input={path}: a model trained on {config.data.name!r} data predicts folders of a CSV "
    "manifest (case_id,pre,post,label with an empty label column)"
  )


def define_flags() -> None:
  """Called by `run`: importing this module defines no flags (CLIs share flag names)."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
  flags.DEFINE_string("model", None, "Exported model folder (python -m resfuse_jax.export).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("pre", None, "Pre-contrast NIfTI of one case.")
  flags.DEFINE_string("post", None, "Post-contrast NIfTI of one case.")
  flags.DEFINE_string("out", None, "Output label map for --pre/--post.")
  flags.DEFINE_string("input", None, "Folder (dataset layout) or CSV manifest of cases.")
  flags.DEFINE_string("output", None, "Output folder for --input.")
  flags.DEFINE_bool("tta", False, "Mirroring test-time augmentation over all axes (8 passes).")
  flags.DEFINE_bool("probabilities", False, "Also write <name>_probabilities.nii.gz [D,H,W,R].")
  flags.DEFINE_bool("figures", False, "Also write <name>.png: scans, subtraction, prediction.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  pair, folder = FLAGS.pre or FLAGS.post or FLAGS.out, FLAGS.input or FLAGS.output
  if bool(FLAGS.workdir) == bool(FLAGS.model) or bool(pair) == bool(folder):
    raise app.UsageError(
      "give --workdir (or --model) and either --pre/--post/--out or --input/--output"
    )
  if FLAGS.model and not exported.is_export(FLAGS.model):
    raise data.DataError(f"--model={FLAGS.model} is not an export: export.json is missing")
  predictor = Predictor(FLAGS.workdir or FLAGS.model, FLAGS.step)
  if pair:
    if not (FLAGS.pre and FLAGS.post and FLAGS.out):
      raise app.UsageError("--pre, --post and --out go together")
    files = data.CaseFiles(Path(FLAGS.pre).name, Path(FLAGS.pre), Path(FLAGS.post), None)
    for p in (files.pre, files.post):
      if not p.is_file():
        raise data.DataError(f"input file {p} not found")
    predictor.predict_case(files, Path(FLAGS.out), FLAGS.tta, FLAGS.probabilities, FLAGS.figures)
    print(f"wrote {FLAGS.out}")
    return
  if not FLAGS.output:
    raise app.UsageError("--input needs --output")
  cases = find_input_cases(Path(FLAGS.input), predictor.config)
  for i, files in enumerate(cases, 1):
    out = Path(FLAGS.output) / f"{files.case_id}.nii.gz"
    predictor.predict_case(files, out, FLAGS.tta, FLAGS.probabilities, FLAGS.figures)
    logging.info("[%d/%d] %s -> %s", i, len(cases), files.case_id, out)
  print(f"wrote {len(cases)} label maps to {FLAGS.output} (checkpoint step {predictor.step})")


def run():
  """Console-script entry point (``resfuse-predict``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
