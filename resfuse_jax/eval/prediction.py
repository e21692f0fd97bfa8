"""New scans -> label maps written in each input's own grid, affine and orientation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from absl import logging

from resfuse_jax import checkpointing, data
from resfuse_jax.data import geometry
from resfuse_jax.errors import CheckpointError, DataError
from resfuse_jax.eval import postprocess
from resfuse_jax.eval.predictor import Predictor


def predict_case(
  predictor: Predictor,
  files: data.CaseFiles,
  out: Path,
  tta: bool = False,
  write_probs: bool = False,
  figure: bool = False,
) -> None:
  """Writes ``out`` (uint8 labels), and optionally ``<name>_probabilities.nii.gz``
  [D, H, W, R] and ``<name>.png`` beside it."""
  config = predictor.config
  case = data.preprocess_case(
    files, predictor.dataset.label_values, data.prep_settings(config.data)
  )
  probs = predictor.probabilities(case, tta)
  labels = postprocess.probabilities_to_labels(
    probs, predictor.dataset.regions, **postprocess.settings_from_config(config.eval)
  )
  out.parent.mkdir(parents=True, exist_ok=True)
  geometry.save_label_map(labels, case, out)
  name = out.name.removesuffix(".nii.gz")
  if figure:
    from resfuse_jax.eval import visualize  # matplotlib only when figures are asked for

    visualize.case_figure(
      out.with_name(f"{name}.png"),
      files.case_id,
      case.pre,
      case.post,
      labels,
      heat=predictor.fusion_heat(case),
      brats_colours=predictor.dataset.brats_like,
    )
  if write_probs:
    maps = np.stack(
      [geometry.to_original_grid(probs[..., r], case) for r in range(probs.shape[-1])], -1
    )
    nib.save(
      nib.Nifti1Image(maps.astype(np.float32), case.affine),
      str(out.with_name(f"{name}_probabilities.nii.gz")),
    )


def load_predictor(workdir: str | None, model: str | None, step: int | None) -> Predictor:
  """A training workdir (``--workdir``) or an export folder (``--model``)."""
  if model and not checkpointing.is_export(model):
    raise CheckpointError(f"--model={model} is not an export: export.json is missing")
  return Predictor.load(workdir or model, step)


def predict_pair(
  predictor: Predictor, pre: str, post: str, out: str, tta: bool, probs: bool, figure: bool
) -> Path:
  """One case given as two files."""
  files = data.CaseFiles(Path(pre).name, Path(pre), Path(post), None)
  for p in (files.pre, files.post):
    if not p.is_file():
      raise DataError(f"input file {p} not found")
  predict_case(predictor, files, Path(out), tta, probs, figure)
  return Path(out)


def predict_folder(
  predictor: Predictor, input_path: str, output: str, tta: bool, probs: bool, figure: bool
) -> list[Path]:
  """Every case of a folder in the training dataset's layout, or of a CSV manifest.

  BraTS outputs are named ``BraTS-GLI-XXXXX-YYY.nii.gz`` as the challenge expects.
  """
  cases = data.find_input_cases(input_path, predictor.config.data)
  written = []
  for i, files in enumerate(cases, 1):
    out = Path(output) / f"{files.case_id}.nii.gz"
    predict_case(predictor, files, out, tta, probs, figure)
    logging.info("[%d/%d] %s -> %s", i, len(cases), files.case_id, out)
    written.append(out)
  return written
