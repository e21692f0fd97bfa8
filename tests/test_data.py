import shutil

import nibabel as nib
import numpy as np
import pytest

from resfuse_jax import data
from resfuse_jax.data import brats

INFO = data.get_dataset("brats")


def copy_case(small_phantom, tmp_path):
  root, _ = small_phantom
  case = sorted(p for p in root.iterdir() if p.is_dir())[0]
  shutil.copytree(case, tmp_path / case.name)
  return tmp_path / case.name, case.name


def test_missing_root_explains_where_brats_comes_from(tmp_path):
  with pytest.raises(data.DataError) as e:
    brats.find_cases(tmp_path / "nope")
  msg = str(e.value)
  assert "data.root" in msg and "Synapse" in msg and "phantom" in msg


def test_empty_root_is_an_error(tmp_path):
  with pytest.raises(data.DataError, match="no BraTS-GLI"):
    brats.find_cases(tmp_path)


def test_missing_post_scan_names_the_file(small_phantom, tmp_path):
  case_dir, cid = copy_case(small_phantom, tmp_path)
  (case_dir / f"{cid}-t1c.nii.gz").unlink()
  (listed,) = brats.find_cases(tmp_path)  # listed; the case's problem when it is read
  with pytest.raises(data.DataError, match=f"{cid}.*t1c.nii.gz"):
    data.read_cases([listed], INFO)


def test_missing_label_allowed_for_inference(small_phantom, tmp_path):
  case_dir, cid = copy_case(small_phantom, tmp_path)
  (case_dir / f"{cid}-seg.nii.gz").unlink()
  (listed,) = brats.find_cases(tmp_path)
  with pytest.raises(data.DataError, match="segmentation"):
    data.read_cases([listed], INFO)
  assert brats.find_cases(tmp_path, require_label=False)[0].label is None


def test_truncated_file_is_reported(small_phantom, tmp_path):
  case_dir, cid = copy_case(small_phantom, tmp_path)
  path = case_dir / f"{cid}-t1n.nii.gz"
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(data.DataError, match=f"{cid}.*cannot read.*t1n"):
    data.read_cases(brats.find_cases(tmp_path), INFO)


def _rewrite(path, fn):
  img = nib.load(path)
  nib.save(nib.Nifti1Image(fn(np.asarray(img.dataobj)), img.affine), path)


@pytest.mark.parametrize(
  "suffix,fn,match",
  [
    ("t1c", lambda x: x[:-1], "shape"),
    ("t1n", lambda x: np.where(x > 0, np.nan, x).astype(np.float32), "NaN"),
    ("t1c", lambda x: np.zeros_like(x), "all zero"),
    ("seg", lambda x: np.where(x == 2, 4, x).astype(np.uint8), r"values \[4\]"),
  ],
)
def test_bad_volumes_are_reported(small_phantom, tmp_path, suffix, fn, match):
  case_dir, cid = copy_case(small_phantom, tmp_path)
  _rewrite(case_dir / f"{cid}-{suffix}.nii.gz", fn)
  with pytest.raises(data.DataError, match=match) as e:
    data.read_cases(brats.find_cases(tmp_path), INFO)
  assert cid in str(e.value)


def test_read_case_crops_and_normalises(small_cases):
  case = small_cases[0]
  assert case.pre.shape == case.post.shape == case.label.shape
  head = case.pre != 0
  assert abs(case.pre[head].mean()) < 1e-3 and abs(case.pre[head].std() - 1) < 1e-3
  assert all(b - a == s for (a, b), s in zip(case.crop, case.pre.shape))


def test_splits_are_deterministic_and_disjoint():
  ids = [f"c{i}" for i in range(23)]
  s0 = data.make_splits(ids, 0, 5)
  assert s0 == data.make_splits(ids, 0, 5)
  assert not set(s0["train"]) & set(s0["val"])
  vals = [data.make_splits(ids, f, 5)["val"] for f in range(5)]
  assert sorted(sum(vals, [])) == sorted(ids)
  with pytest.raises(ValueError, match="fold"):
    data.make_splits(ids, 5, 5)
  everything = data.make_splits(ids, -1, 5)
  assert everything["train"] == sorted(ids) and everything["val"] == sorted(ids)


def test_dataset_registry_lists_the_valid_names():
  from resfuse_jax.errors import ConfigError

  assert data.names() == ["brats", "breast", "manifest", "phantom"]
  assert data.get_dataset("breast").region_names == ["lesion"]
  assert data.get_dataset("phantom").brats_like and not data.get_dataset("manifest").brats_like
  with pytest.raises(ConfigError, match="Unknown data.name 'mri'; registered datasets: brats"):
    data.get_dataset("mri")


def test_prediction_inputs_follow_the_training_layout(small_phantom, tmp_path):
  import ml_collections

  root, _ = small_phantom
  cfg = ml_collections.ConfigDict({"name": "phantom"})
  cases = data.find_input_cases(root, cfg)
  assert [c.case_id for c in cases] == sorted(p.name for p in root.iterdir() if p.is_dir())
  manifest = tmp_path / "cases.csv"
  manifest.write_text(f"case_id,pre,post,label\nx,{cases[0].pre},{cases[0].post},\n")
  (case,) = data.find_input_cases(manifest, cfg)  # a CSV works whatever trained the model
  assert case.case_id == "x" and case.label is None
  with pytest.raises(data.DataError, match="CSV manifest"):
    data.find_input_cases(root, ml_collections.ConfigDict({"name": "manifest"}))
