"""Label maps for new scans, written in each input's own grid, affine and orientation.

  python -m resfuse_jax.predict --workdir=W --pre=t1n.nii.gz --post=t1c.nii.gz --out=seg.nii.gz
  python -m resfuse_jax.predict --workdir=W --input=DIR --output=OUT [--tta] [--probabilities]
  python -m resfuse_jax.predict --model=E [--backend=auto|jax|openvino|onnxruntime] ...
      (an export: python -m resfuse_jax.export)
  python -m resfuse_jax.predict --model=E --backend=openvino --precision=bf16 ...
      (where export measured bf16 to agree with f32 on the validation cases)
  python -m resfuse_jax.predict --model=E --pre=DICOM/T1 --post=DICOM/T1C --out=seg.dcm
      (DICOM series folders in, a DICOM SEG out; --dicom_seg writes one beside NIfTI)
  python -m resfuse_jax.predict --model=E --input=STUDIES --output=OUT --pre_series='T1*pre*'
      --post_series='T1*post*' --dicom_seg   (one DICOM study folder per case)
  python -m resfuse_jax.predict --workdir=W [--folds=all|0,1,...] ...
      (a cross-validation, main --folds=all, or its export: the mean of the folds'
      probabilities, then W's post-processing chosen on the pooled out-of-fold predictions)

``--input`` is a folder in the layout of the training dataset (BraTS 2023 case folders, or the
MAMA-MIA ``images/`` tree; a scan there may be a DICOM series folder of the same name), a CSV
manifest, or a folder of DICOM studies; segmentations are not needed. BraTS outputs are
named ``BraTS-GLI-XXXXX-YYY.nii.gz`` as the challenge expects.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from resfuse_jax import cli
from resfuse_jax.inference import prediction, runtimes
from resfuse_jax.serving import onnx_cache
from resfuse_jax.workdir import BAD_CASES

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Called by `run`: importing this module defines no flags (CLIs share flag names)."""
  flags.DEFINE_string(
    "workdir", None, "Training workdir (config.json + checkpoints/), or a cross-validation's."
  )
  flags.DEFINE_string("model", None, "Exported model folder (python -m resfuse_jax.export).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest; one model only).")
  flags.DEFINE_string(
    "folds",
    None,
    "For a cross-validation W (or its ensemble export): the folds to average, 'all' or "
    "0,1,...; default every finished fold.",
  )
  _define_case_flags()
  flags.DEFINE_string("input", None, "Folder (dataset layout) or CSV manifest of cases.")
  flags.DEFINE_string("output", None, "Output folder for --input.")
  _define_output_flags()


def _define_case_flags() -> None:
  """One case (--pre/--post/--out) and what DICOM inputs and outputs take."""
  flags.DEFINE_string(
    "pre", None, "Pre-contrast scan of one case: a NIfTI file or a folder of DICOM files."
  )
  flags.DEFINE_string(
    "post", None, "Post-contrast scan of one case: a NIfTI file or a folder of DICOM files."
  )
  flags.DEFINE_string(
    "out", None, "Output label map for --pre/--post: NIfTI, or NAME.dcm for a DICOM SEG."
  )
  flags.DEFINE_string(
    "pre_series",
    None,
    "Which series of a DICOM folder is the pre-contrast scan, when it holds several: its "
    "SeriesInstanceUID, SeriesDescription or a shell pattern of the description.",
  )
  flags.DEFINE_string("post_series", None, "As --pre_series, for the post-contrast scan.")
  flags.DEFINE_bool(
    "dicom_seg",
    False,
    "Also write a DICOM Segmentation <name>.dcm beside each NIfTI label map (DICOM inputs): "
    "one segment per label, referencing the post-contrast series.",
  )


def _define_output_flags() -> None:
  flags.DEFINE_bool("tta", False, "Mirroring test-time augmentation over all axes (8 passes).")
  flags.DEFINE_bool("probabilities", False, "Also write <name>_probabilities.nii.gz [D,H,W,R].")
  flags.DEFINE_bool("figures", False, "Also write <name>.png: scans, subtraction, prediction.")
  flags.DEFINE_string(
    "postprocess",
    "auto",
    "auto: the post-processing chosen on validation (W/postprocessing.json, carried into "
    "exports) when there is one; none: thresholds only; or a postprocessing.json to apply.",
  )
  _define_runtime_flags()


def _define_runtime_flags() -> None:
  """What runs the windows, and its knobs."""
  flags.DEFINE_enum(
    "backend",
    "auto",
    list(runtimes.BACKENDS),
    "What runs the network on each window: auto is, when JAX runs on CPU, the first "
    "installed of openvino and onnxruntime (on an export's model.onnx, or a --workdir's "
    "checkpoint translated once into the user's cache), and JAX on a GPU. Everything else "
    "(preprocessing, stitching, TTA, post-processing) is the same code.",
  )
  flags.DEFINE_enum(
    "precision",
    "f32",
    ["f32", "bf16"],
    "OpenVINO's inference precision. bf16 only for an export whose agreement check (run "
    "by export on the validation cases) stayed within 0.1% of labels and 0.005 Dice.",
  )
  flags.DEFINE_integer(
    "threads", 0, "CPU threads of the OpenVINO/onnxruntime window (0: the runtime's default)."
  )
  flags.DEFINE_integer("streams", 0, "OpenVINO's NUM_STREAMS (0: OpenVINO's default).")
  flags.DEFINE_integer(
    "windows_per_call", 0, "Windows per OpenVINO/onnxruntime call (0: the default, 1 on CPU)."
  )
  flags.DEFINE_enum(
    "on_bad_case",
    "error",
    ["error", "skip"],
    "With --input: stop at the first case whose input is bad, or skip it and list it in "
    "OUTPUT/bad_cases.json.",
  )


def _check_flags(pair, folder) -> None:
  """The flag combinations, before anything loads."""
  if FLAGS.workdir and FLAGS.model:
    raise app.UsageError(
      "give --workdir (a training workdir) or --model (an export), not both: they name two models"
    )
  if bool(FLAGS.workdir) == bool(FLAGS.model) or bool(pair) == bool(folder):
    raise app.UsageError(
      "give --workdir (or --model) and either --pre/--post/--out or --input/--output"
    )
  if pair and not (FLAGS.pre and FLAGS.post and FLAGS.out):
    raise app.UsageError("--pre, --post and --out go together")
  if folder and not (FLAGS.input and FLAGS.output):
    raise app.UsageError("--input and --output go together")
  prediction.check_model_flags(FLAGS.workdir or FLAGS.model, FLAGS.step, FLAGS.folds)
  for flag, scan in (("pre_series", FLAGS.pre), ("post_series", FLAGS.post)):
    if pair and FLAGS[flag].value and not Path(scan or "").is_dir():
      raise app.UsageError(
        f"--{flag} chooses a series of a DICOM folder, but --{flag[:-7]}={scan} is not a folder"
      )
  if pair:
    prediction.check_label_map_path(FLAGS.out)  # before the model loads


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  pair, folder = FLAGS.pre or FLAGS.post or FLAGS.out, FLAGS.input or FLAGS.output
  _check_flags(pair, folder)
  prediction.check_outputs(  # before the model loads: no output may touch an input
    FLAGS.workdir,
    FLAGS.model,
    (FLAGS.pre, FLAGS.post, FLAGS.out) if pair else None,
    (FLAGS.input, FLAGS.output) if folder else None,
    FLAGS.probabilities,
    FLAGS.figures,
    FLAGS.postprocess,
    FLAGS.dicom_seg,
    (FLAGS.pre_series, FLAGS.post_series),
  )
  settings = runtimes.WindowSettings(
    FLAGS.precision, FLAGS.threads, FLAGS.streams, FLAGS.windows_per_call
  )
  predictor = prediction.load_predictor(
    FLAGS.workdir,
    FLAGS.model,
    FLAGS.step,
    FLAGS.postprocess,
    FLAGS.backend,
    FLAGS.folds,
    settings,
    onnx_cache.WorkdirGraphs(),  # a --workdir's graph: built by serving, run by inference
  )
  options = (FLAGS.tta, FLAGS.probabilities, FLAGS.figures)
  series = (FLAGS.pre_series, FLAGS.post_series)
  if pair:
    out = prediction.predict_pair(
      predictor, FLAGS.pre, FLAGS.post, FLAGS.out, *options, FLAGS.dicom_seg, series
    )
    print(f"wrote {out} ({predictor.describe()})")
  else:
    written, bad = prediction.predict_folder(
      predictor, FLAGS.input, FLAGS.output, *options, FLAGS.on_bad_case, FLAGS.dicom_seg, series
    )
    print(
      f"wrote {len(written)} label maps to {FLAGS.output} ({predictor.describe()})"
      + (f"; skipped {len(bad)} bad case(s), see {Path(FLAGS.output) / BAD_CASES}" if bad else "")
    )


def run():
  """Console-script entry point (``resfuse-predict``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
