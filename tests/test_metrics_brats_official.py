"""Lesion-wise metrics cross-checked against the BraTS organisers' package.

``brats-evaluation`` (panoptica-based, bundled config ``gli``) is run exactly as its
command line runs each case (``evaluate_single_exam`` on NIfTI files); its numbers
must equal ``metrics.lesion_wise_panoptica`` region by region. The 2023 rules
(``metrics.lesion_wise``: reference dilation, 50-voxel lesions, spurious lesions
scored 0) differ on purpose; the last test pins how.
"""

import math
from importlib.resources import files as package_files

import nibabel as nib
import numpy as np
import pytest

from resfuse_jax.data import brats
from resfuse_jax.evaluation import metrics
from resfuse_jax.inference import postprocess

evaluation = pytest.importorskip(
  "brats_evaluation.evaluation",
  reason="brats-evaluation is not installed (it is in the test extra: pip install -e '.[test]')",
)
GROUPS = {"WT": "wt", "TC": "tc", "ET": "et"}
SHAPE = (48, 48, 48)


def box(labels, value, corner, size):
  labels[tuple(slice(c, c + s) for c, s in zip(corner, size))] = value


def several_lesions():
  ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
  for corner in ((4, 4, 4), (4, 30, 4), (30, 30, 30)):  # three tumours, each with a core
    box(ref, 2, corner, (10, 10, 10))
    box(ref, 3, tuple(c + 3 for c in corner), (4, 4, 4))
  box(pred, 2, (5, 4, 4), (10, 10, 9))  # tumour 1, shifted
  box(pred, 3, (7, 7, 8), (4, 4, 3))
  box(pred, 2, (4, 30, 4), (10, 10, 10))  # tumour 2, exact, its core as necrosis
  box(pred, 1, (7, 33, 7), (4, 4, 4))
  box(pred, 3, (20, 4, 40), (3, 3, 3))  # a spurious enhancing speck; tumour 3 missed
  return pred, ref


def small_lesion():
  ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
  box(ref, 2, (4, 4, 4), (12, 12, 12))
  box(ref, 2, (35, 35, 35), (3, 3, 2))  # 18 voxels: under the 2023 rules' 50
  box(pred, 2, (4, 4, 5), (12, 12, 12))
  return pred, ref


def empty_reference():
  ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
  box(pred, 3, (10, 10, 10), (5, 5, 5))
  return pred, ref


def empty_prediction():
  pred, ref = empty_reference()
  return ref, pred


def both_empty():
  return np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)


CASES = [several_lesions, small_lesion, empty_reference, empty_prediction, both_empty]


@pytest.fixture(scope="module")
def evaluator():
  from panoptica import Panoptica_Evaluator

  config = package_files("brats_evaluation").joinpath("configs", "config_gli.yaml")
  return Panoptica_Evaluator.load_from_config(str(config))


def official(evaluator, tmp_path, pred, ref) -> dict:
  paths = {}
  for name, labels in (("pred", pred), ("ref", ref)):
    paths[name] = tmp_path / f"BraTS-GLI-00000-000-{name}.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(paths[name]))
  result = evaluation.evaluate_single_exam(str(paths["pred"]), str(paths["ref"]), "c", evaluator)
  assert "error" not in result, result.get("error")
  return result


def same(ours: float, theirs) -> bool:
  theirs = float("nan") if theirs is None else float(theirs)
  if math.isnan(ours) or math.isnan(theirs):
    return math.isnan(ours) and math.isnan(theirs)
  return ours == pytest.approx(theirs, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("make", CASES, ids=[c.__name__ for c in CASES])
def test_lesion_wise_scores_equal_the_organisers_package(evaluator, tmp_path, make):
  pred, ref = make()
  result = official(evaluator, tmp_path, pred, ref)
  pred_m = postprocess.region_masks(pred, brats.REGIONS)
  ref_m = postprocess.region_masks(ref, brats.REGIONS)
  for r, (region, group) in enumerate(GROUPS.items()):
    ours = metrics.lesion_wise_panoptica(pred_m[..., r], ref_m[..., r])
    theirs = result[group]
    for key, their_key in (("tp", "tp"), ("fp", "fp"), ("fn", "fn")):
      assert ours[key] == theirs[their_key], (region, key, ours, theirs)
    for key, their_key in (("dice", "sq_dsc"), ("hd95", "sq_hd95"), ("f1", "rq")):
      assert same(ours[key], theirs[their_key]), (region, key, ours[key], theirs[their_key])
    if pred_m[..., r].any() and ref_m[..., r].any():  # voxel Dice is the package's global one
      assert same(metrics.dice(pred_m[..., r], ref_m[..., r]), theirs["global_bin_dsc"])


def test_the_2023_rules_differ_from_the_package_as_documented(evaluator, tmp_path):
  pred, ref = several_lesions()
  result = official(evaluator, tmp_path, pred, ref)
  et_pred = postprocess.region_masks(pred, brats.REGIONS)[..., 2]
  et_ref = postprocess.region_masks(ref, brats.REGIONS)[..., 2]
  rules_2023 = metrics.lesion_wise(et_pred, et_ref)
  # 2023: a missed lesion (tumour 3, 64 voxels) and a spurious speck each score Dice 0;
  # the package averages Dice over matched lesions only and counts the misses in rq.
  assert result["et"]["tp"] == 1 and result["et"]["fn"] == 2 and result["et"]["fp"] == 1
  assert rules_2023["dice"] < result["et"]["sq_dsc"]
  # 2023: an 18-voxel lesion is ignored; the package counts it as missed.
  pred, ref = small_lesion()
  result = official(evaluator, tmp_path, pred, ref)
  wt_pred, wt_ref = pred > 0, ref > 0
  assert metrics.lesion_wise(wt_pred, wt_ref)["lesions"] == 1 and result["wt"]["fn"] == 1
