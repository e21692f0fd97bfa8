"""Validation scored on each case's original grid, against its source label file."""

import nibabel as nib
import numpy as np
import pytest
from conftest import smoke_config
from scipy import ndimage
from test_datasets import AFFINE, save, write_breast

from resfuse_jax import data
from resfuse_jax.data import brats, breast, cache, geometry
from resfuse_jax.evaluation import evaluation, grids, metrics
from resfuse_jax.evaluation.postprocess_selection import CaseMasks

SHAPE = (40, 40, 32)
FLIPPED = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS on disk: read back reoriented
HEAD = np.s_[4:36, 4:36, 2:30]  # even corners and sizes: 2 mm blocks never straddle it
PREDICTED = [np.s_[12:18, 12:18, 12:18], np.s_[26:28, 8:10, 8:10], np.s_[26:30, 26:30, 20:22]]


def write_case(root, rng):
  """A 1 mm BraTS-layout case whose post-contrast scan marks the prediction (1000 on
  2-voxel-aligned blocks, so that 2 mm resampling and back keeps it exactly); its label
  has a lesion with a core and a 50-voxel satellite, not aligned to anything."""
  pre, post = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
  pre[HEAD] = rng.uniform(100, 200, pre[HEAD].shape)
  post[HEAD] = 100.0
  post[10:20, 10:20, 10:20] = 120.0  # a third intensity: a scan, not a mask
  for box in PREDICTED:
    post[box] = 1000.0
  label = np.zeros(SHAPE, np.uint8)
  label[11:19, 11:19, 11:19] = 2
  label[13:17, 13:17, 13:17] = 3
  label[26:31, 26:31, 20:22] = 2  # 50 voxels = 50 mm³: a lesion at 1 mm
  cid = "BraTS-GLI-00001-000"
  for kind, arr in (("t1n", pre), ("t1c", post), ("seg", label)):
    save(arr, root / cid / f"{cid}-{kind}.nii.gz", FLIPPED)
  return brats.find_cases(root)[0]


def marked(tiles: np.ndarray) -> np.ndarray:
  """A window function predicting every region where the z-scored post-contrast scan is high."""
  return np.repeat(tiles[..., 1:2] > 2.0, 3, axis=-1).astype(np.float32)


def scores(row: dict) -> dict:
  return {k: v for k, v in row.items() if k != "case"}


def test_the_same_case_at_1mm_and_resampled_to_2mm_scores_the_same_on_its_original_grid(
  tmp_path,
):
  files = write_case(tmp_path / "brats", np.random.default_rng(0))
  config = smoke_config()
  at_1mm = data.preprocess_case(files, brats.LABELS, data.PrepSettings())
  at_2mm = data.preprocess_case(files, brats.LABELS, data.PrepSettings(target_spacing=(2.0,) * 3))
  assert at_2mm.pre.shape == (16, 16, 14) and at_2mm.spacing == (2.0, 2.0, 2.0)
  rows = {}
  for name, case in (("1mm", at_1mm), ("2mm", at_2mm)):
    for grid in grids.GRIDS:
      acc = evaluation.evaluate_cases(marked, [case], config, lesion_wise=True, grid=grid)
      rows[name, grid] = scores(acc.rows[0])
  original = rows["1mm", "original"]
  assert original["lesion_dice_WT"] < 1.0 and original["dice_WT"] > 0.3  # not trivial
  assert rows["2mm", "original"] == pytest.approx(original, rel=1e-12, abs=1e-12)
  assert rows["1mm", "resampled"] == pytest.approx(original, rel=1e-12, abs=1e-12)
  resampled = rows["2mm", "resampled"]  # the 2 mm grid's own label and spacing: not the same
  assert resampled["lesion_dice_WT"] != pytest.approx(original["lesion_dice_WT"])


@pytest.fixture
def breast_case(tmp_path):
  """A permuted, flipped, anisotropic breast case with a zero border, resampled coarser."""
  root = write_breast(tmp_path / "mama", n=1)
  (files,) = breast.find_cases(root)
  label = np.zeros((12, 14, 10), np.uint8)
  label[3:9, 4:11, 3:7] = 1  # 168 voxels of 1.2 mm³
  label[8:10, 2:4, 8:9] = 1  # 4 voxels: under 50 mm³
  save(label, files.label, AFFINE)
  settings = data.PrepSettings(target_spacing=(1.1, 1.3, 0.7))
  return files, data.preprocess_case(files, breast.LABELS, settings)


def test_original_grid_scores_equal_the_written_prediction_against_the_label_file(breast_case):
  files, case = breast_case
  crop_shape = tuple(b - a for a, b in case.crop)
  assert case.pre.shape != crop_shape != geometry.canonical_shape(case.affine, case.shape)
  rng = np.random.default_rng(1)
  pred = ndimage.gaussian_filter(rng.random(case.pre.shape), 1.0) > 0.52
  pred |= ndimage.binary_erosion(case.label > 0)
  scored = grids.case_masks(case, pred[..., None], breast.REGIONS)
  written = geometry.to_original_grid(pred.astype(np.uint8), case) > 0  # what predict writes
  source = nib.load(files.label)
  ref, spacing = np.asarray(source.dataobj) > 0, source.header.get_zooms()[:3]
  p, r = scored.pred[..., 0], scored.ref[..., 0]
  assert metrics.dice(p, r) == pytest.approx(metrics.dice(written, ref), abs=1e-12)
  assert metrics.hd95(p, r, scored.spacing) == pytest.approx(
    metrics.hd95(written, ref, spacing), abs=1e-9
  )
  lesions = metrics.lesion_wise(p, r, scored.spacing)
  assert lesions == pytest.approx(metrics.lesion_wise(written, ref, spacing))
  assert lesions["lesions"] == 1 and metrics.dice(written, ref) < 1.0


def test_the_reference_is_the_label_file_not_the_preprocessed_label(breast_case):
  files, case = breast_case
  empty = np.zeros((*case.pre.shape, 1), bool)
  scored = grids.case_masks(case, empty, breast.REGIONS)
  source = np.asarray(nib.load(files.label).dataobj) > 0
  assert scored.ref.sum() == source.sum() == 172 != (case.label > 0).sum()
  with pytest.raises(ValueError, match="grid must be one of"):
    grids.case_masks(case, empty, breast.REGIONS, grid="mm")


def test_without_resampling_original_and_resampled_grids_score_alike(small_cases):
  config = smoke_config()
  kept: list[CaseMasks] = []
  original = evaluation.evaluate_cases(
    marked, small_cases[:2], config, lesion_wise=True, collect=kept
  )
  resampled = evaluation.evaluate_cases(
    marked, small_cases[:2], config, lesion_wise=True, grid=grids.RESAMPLED
  )
  assert [c.case_id for c in kept] == [c.case_id for c in small_cases[:2]]
  assert all(c.pred.shape == c.ref.shape and c.pred.shape[-1] == 3 for c in kept)
  for a, b in zip(original.rows, resampled.rows):
    assert scores(a)["dice_WT"] > 0.0
    assert scores(a) == pytest.approx(scores(b), rel=1e-12, abs=1e-12)


def test_a_cached_case_knows_its_source_label_file(tmp_path):
  files = write_case(tmp_path / "brats", np.random.default_rng(2))
  out = tmp_path / "cache"
  cache.write_case(files, out, data.PrepSettings(), brats.REGIONS, brats.LABELS)
  (case,) = data.load_cases(out, [files.case_id])
  assert case.label_file == files.label.absolute()
  label, spacing = geometry.original_label(case)
  assert label.shape == SHAPE and spacing == (1.0, 1.0, 1.0) and (label > 0).sum() == 562
  case.label_file = None
  with pytest.raises(data.DataError, match="source label file is unknown"):
    geometry.original_label(case)
