"""New scans -> label maps written in each input's own grid, affine and orientation.

Every output is written atomically (a temporary name, then a rename) and stays
inside the folder asked for; a model whose probabilities are not finite (a
damaged checkpoint) is refused rather than written as an all-background map.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from absl import logging

from resfuse_jax import checkpointing, data, files, workdir
from resfuse_jax.data import geometry
from resfuse_jax.errors import CheckpointError, ConfigError, DataError, OutputError
from resfuse_jax.inference import dicom_seg, ensemble, outputs, postprocess, runtimes
from resfuse_jax.inference.ensemble import EnsemblePredictor
from resfuse_jax.inference.predictor import Predictor
from resfuse_jax.workdir import BAD_CASES


def predict_case(
  predictor: Predictor | EnsemblePredictor,
  files: data.CaseFiles,
  out: Path,
  tta: bool = False,
  write_probs: bool = False,
  figure: bool = False,
  seg: bool = False,
) -> None:
  """Writes ``out`` (uint8 labels as NIfTI, or a DICOM SEG for a ``.dcm`` name), and
  optionally ``<name>_probabilities.nii.gz`` [D, H, W, R], ``<name>.png`` and (``seg``,
  for DICOM inputs) the SEG ``<name>.dcm`` beside it."""
  config = predictor.config
  task = predictor.task
  as_seg = dicom_seg.is_seg_path(out)  # the SEG is the label map
  seg_file = case_outputs(out, False, False, True)[-1] if seg and not as_seg else None
  grid = dicom_seg.prepare(files, seg_file or out) if as_seg or seg_file else None  # checked first
  case = data.preprocess_case(
    files, task.dataset.label_values, task.prep_settings, task.input_limits, training=False
  )
  probs = predictor.probabilities(case, tta)
  if not np.isfinite(probs).all():
    raise CheckpointError(
      f"the model (checkpoint step {predictor.step}) gave non-finite probabilities for case "
      f"{files.case_id}; its parameters are damaged. Nothing was written to {out}"
    )
  regions = predictor.dataset.regions
  thresholded = postprocess.threshold(probs, **postprocess.settings_from_config(config.eval))
  # The rules were chosen on each validation case's original grid: applied there too.
  masks = geometry.to_canonical_grid(thresholded, case)
  masks = postprocess.apply_rules(masks, predictor.rules, case.original_spacing or case.spacing)
  labels = postprocess.masks_to_labels(masks, regions)
  del masks
  _, probs_file, figure_file = case_outputs(out, True, True)  # the names check_outputs checks
  if not as_seg:
    geometry.save_canonical_label_map(labels, case, out)
  if grid is not None:
    dicom_seg.write_case_seg(
      predictor, grid, geometry.from_canonical(labels, case), seg_file or out
    )
  del labels
  if figure:
    _write_figure(predictor, case, thresholded, figure_file)
  if write_probs:
    maps = np.stack(
      [geometry.to_original_grid(probs[..., r], case) for r in range(probs.shape[-1])], -1
    )
    geometry.save_nifti(nib.Nifti1Image(maps.astype(np.float32), case.affine), probs_file)


def _write_figure(predictor, case: data.Case, thresholded: np.ndarray, path: Path) -> None:
  """Scans, subtraction and prediction on the preprocessed grid, as ``path`` (PNG)."""
  from resfuse_jax import visualize  # matplotlib only when figures are asked for

  regions = predictor.dataset.regions
  labels = postprocess.masks_to_labels(
    postprocess.apply_rules(thresholded, predictor.rules, case.spacing), regions
  )
  visualize.case_figure(
    path,
    case.case_id,
    case.pre,
    case.post,
    labels,
    heat=predictor.fusion_heat(case),
    brats_colours=predictor.dataset.brats_like,
  )


LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", dicom_seg.SUFFIX)


def label_map_stem(out: Path) -> str:
  """``out``'s name without its NIfTI suffix (any letter case)."""
  lower = out.name.lower()
  for suffix in LABEL_MAP_SUFFIXES:
    if lower.endswith(suffix):
      return out.name[: -len(suffix)]
  return out.name


def check_label_map_path(out: str | Path, flag: str = "--out") -> Path:
  """Refuses, before the model is loaded, a label-map name that is neither NIfTI nor a
  DICOM SEG.

  ``.nii.gz`` and ``.nii`` (and ``.dcm``: a DICOM SEG, for DICOM inputs) are accepted in
  any letter case; anything else (no suffix, ``.png``, ``.nii.zip``) is an ``OutputError``
  naming the path.
  """
  out = Path(out)
  if not out.name.lower().endswith(LABEL_MAP_SUFFIXES) or not label_map_stem(out):
    raise OutputError(
      f"{flag}={out}: a label map is written as NIfTI; give a name ending in .nii.gz or .nii "
      "(or .dcm for a DICOM SEG of DICOM inputs)"
    )
  return out


def case_outputs(out: Path, probs: bool, figure: bool, seg: bool = False) -> list[Path]:
  """The files `predict_case` writes for the label map ``out``."""
  name = label_map_stem(out)
  extra = [f"{name}_probabilities.nii.gz"] * probs + [f"{name}.png"] * figure
  extra += [f"{name}{dicom_seg.SUFFIX}"] * (seg and not dicom_seg.is_seg_path(out))
  return [out, *(out.with_name(e) for e in extra)]


def _case_inputs(case_files: data.CaseFiles, pre: str = "--pre", post: str = "--post") -> list:
  named = [(pre, case_files.pre), (post, case_files.post)]
  return named + ([("label", case_files.label)] if case_files.label is not None else [])


def _split_folders(named: list) -> tuple[list, list]:
  """(input files, input folders): a DICOM series is a folder, and nothing may be written
  into it (the next read of the folder would take a SEG for one of its slices)."""
  folders = [(flag, p) for flag, p in named if Path(p).is_dir()]
  return [(flag, p) for flag, p in named if not Path(p).is_dir()], folders


def _require_export(model: str | None) -> None:
  if model and not checkpointing.is_export(model):
    raise CheckpointError(f"--model={model} is not an export: export.json is missing")


def check_outputs(
  workdir_: str | None,
  model: str | None,
  pair: tuple[str, str, str] | None = None,
  folder: tuple[str, str] | None = None,
  probs: bool = False,
  figure: bool = False,
  postprocess_: str = "auto",
  seg: bool = False,
  series: tuple[str | None, str | None] = (None, None),
) -> None:
  """Refuses, before the model loads, any output of predict that would touch an input,
  and a DICOM SEG asked of NIfTI inputs.

  ``workdir_`` / ``model``: the workdir or export read (one of them); ``pair``: (--pre,
  --post, --out); ``folder``: (--input, --output); ``seg``: ``--dicom_seg``; ``series``:
  (--pre_series, --post_series). The rule is `outputs.refuse_overlaps`.
  """
  _require_export(model)
  source, flag = (model, "--model") if model else (workdir_, "--workdir")
  inputs = [] if postprocess_ in ("auto", "none") else [("--postprocess", postprocess_)]
  out_files, out_folders, in_folders = [], [], []
  if pair is not None:
    pre, post, out = pair
    case_files = data.CaseFiles(Path(pre).name, Path(pre), Path(post), None, None, *series)
    if seg or dicom_seg.is_seg_path(out):
      dicom_seg.require_dicom_post(case_files, "--dicom_seg" if seg else f"--out={out}")
    files_, folders = _split_folders(_case_inputs(case_files))
    inputs, in_folders = inputs + files_, in_folders + folders
    out_files = [("--out", p) for p in case_outputs(Path(out), probs, figure, seg)]
  if folder is not None:
    input_path, output = folder
    out_folders = [("--output", output)]
    if Path(input_path).is_dir():
      in_folders = [("--input", input_path)]
    else:
      inputs.append(("--input", input_path))
    outputs.refuse_overlaps((), out_folders, inputs, in_folders, [(flag, source)])
    cases = data.find_input_cases(input_path, workdir.read_config(source).data, *series)
    for case_files in cases:
      if seg:
        dicom_seg.require_dicom_post(case_files, "--dicom_seg")
      named = _case_inputs(case_files, f"{case_files.case_id} pre", f"{case_files.case_id} post")
      files_, folders = _split_folders(named)
      inputs, in_folders = inputs + files_, in_folders + folders
      name = files.check_name(case_files.case_id, f"--input={input_path}")
      out_files += [
        ("--output", p) for p in case_outputs(Path(output, f"{name}.nii.gz"), probs, figure, seg)
      ]
  outputs.refuse_overlaps(out_files, out_folders, inputs, in_folders, [(flag, source)])


def check_model_flags(source: str, step: int | None, folds: str | None) -> None:
  """Refuses, before anything loads, ``--folds`` for one model and ``--step`` for several
  (a missing ``source`` is left to the loader, which names what it lacks)."""
  if not Path(source).is_dir():
    return
  several = ensemble.is_ensemble(source)
  if folds is not None and not several:
    raise ConfigError(
      f"--folds needs a cross-validation (a workdir with {workdir.FOLDS}: main --folds=all) "
      f"or its ensemble export; {source} holds one model"
    )
  if step is not None and several:
    raise ConfigError(
      f"--step names one checkpoint, but {source} holds one model per fold, each with its own "
      "steps (the latest of each is used); leave --step out, or predict with one fold's folder"
    )


def load_predictor(
  workdir: str | None,
  model: str | None,
  step: int | None,
  postprocess_: str = "auto",
  backend: str = "auto",
  folds: str | None = None,
  settings: runtimes.WindowSettings | None = None,
  graphs: runtimes.GraphSource | None = None,
) -> Predictor | EnsemblePredictor:
  """A training workdir (``--workdir``) or an export folder (``--model``); for a
  cross-validation W or its ensemble export, the ensemble of its folds (``folds``:
  ``all`` or ``0,1``; None: every finished fold).

  ``postprocess_``: ``auto`` applies the post-processing chosen on validation when the
  workdir or export has one, ``none`` applies none, anything else is a
  ``postprocessing.json`` file to apply. ``backend``: `runtimes.choose` (``graphs``
  builds a training workdir's ONNX graph); ``settings``: the runtime's knobs.
  """
  _require_export(model)
  source = workdir or model
  check_model_flags(source, step, folds)
  if ensemble.is_ensemble(source):
    predictor = EnsemblePredictor.load(source, folds, backend, postprocess_, settings, graphs)
  else:
    predictor = Predictor.load(source, step, backend, postprocess_, settings, graphs)
  logging.info("model: %s", predictor.describe())
  if predictor.rules is None:
    logging.info("post-processing: none (thresholds and nesting only)")
  else:
    names = predictor.dataset.region_names
    logging.info(
      "post-processing: %s",
      "; ".join(f"{n}: {r.describe()}" for n, r in zip(names, predictor.rules)),
    )
  return predictor


def predict_pair(
  predictor: Predictor | EnsemblePredictor,
  pre: str,
  post: str,
  out: str,
  tta: bool,
  probs: bool,
  figure: bool,
  seg: bool = False,
  series: tuple[str | None, str | None] = (None, None),
) -> Path:
  """One case given as two NIfTI files or two DICOM series folders (``series``: which
  series of each folder, when it holds several)."""
  case_files = data.CaseFiles(Path(pre).name, Path(pre), Path(post), None, None, *series)
  data.require_scan(case_files.pre, "--pre")
  data.require_scan(case_files.post, "--post")
  out = Path(out)
  if out.is_dir():
    raise OutputError(f"--out={out} is a folder; give the label map's file name")
  check_label_map_path(out)
  check_writable(out.parent, "--out")
  predict_case(predictor, case_files, out, tta, probs, figure, seg)
  return out


def check_writable(folder: Path, flag: str) -> None:
  """Fails before any inference if ``folder`` cannot take the outputs."""
  if folder.exists() and not folder.is_dir():
    raise OutputError(f"{flag}: {folder} is a file, expected a folder")
  files.make_dirs(folder)
  try:
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
  except OSError as e:
    raise OutputError(f"{flag}: cannot write into {folder}: {e.strerror}") from None
  os.close(fd)
  os.unlink(probe)


def predict_folder(
  predictor: Predictor | EnsemblePredictor,
  input_path: str,
  output: str,
  tta: bool,
  probs: bool,
  figure: bool,
  on_bad_case: str = "error",
  seg: bool = False,
  series: tuple[str | None, str | None] = (None, None),
) -> tuple[list[Path], list[dict]]:
  """Every case of a folder in the training dataset's layout, or of a CSV manifest.

  BraTS outputs are named ``BraTS-GLI-XXXXX-YYY.nii.gz`` as the challenge expects.
  ``on_bad_case='skip'`` goes on past a case whose input is bad and lists it in
  ``OUT/bad_cases.json``. ``seg``: a DICOM SEG beside each label map (DICOM inputs);
  ``series``: `data.find_input_cases`. Returns (written label maps, skipped cases).
  """
  if on_bad_case not in ("error", "skip"):
    raise ConfigError(f"--on_bad_case must be 'error' or 'skip', got {on_bad_case!r}")
  output = Path(output)
  cases = data.find_input_cases(input_path, predictor.config.data, *series)
  check_writable(output, "--output")
  written, bad = [], []
  for i, case_files in enumerate(cases, 1):
    case_files = dataclasses.replace(case_files, label=None)  # never read: not demanded
    try:
      name = files.check_name(case_files.case_id, f"--input={input_path}")
      data.check_case_id(case_files)
      out = files.under(output, f"{name}.nii.gz")
      predict_case(predictor, case_files, out, tta, probs, figure, seg)
    except DataError as e:
      if on_bad_case == "error":
        raise
      logging.warning("[%d/%d] %s skipped: %s", i, len(cases), case_files.case_id, e)
      bad.append({"case_id": case_files.case_id, "error": str(e)})
      continue
    logging.info("[%d/%d] %s -> %s", i, len(cases), case_files.case_id, out)
    written.append(out)
  if bad:
    files.write_json(output / BAD_CASES, bad)
    if not written:
      raise DataError(f"every case of --input={input_path} was bad; see {output / BAD_CASES}")
  return written, bad
