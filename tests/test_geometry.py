import nibabel as nib
import numpy as np
import pytest
from test_datasets import write_breast

from resfuse_jax import data
from resfuse_jax.data import breast, geometry


@pytest.mark.parametrize("target_spacing", [None, (0.75, 0.4, 0.5)])
def test_label_maps_return_to_the_input_grid_voxel_for_voxel(tmp_path, target_spacing):
  """A non-canonical, anisotropic input: preprocess, map the label back, compare to the file."""
  root = write_breast(tmp_path / "mama", n=1)
  (files,) = breast.find_cases(root)
  settings = data.PrepSettings(target_spacing=target_spacing)
  case = data.preprocess_case(files, breast.LABELS, settings)
  if target_spacing is not None:  # exactly 2x finer on every axis: nearest round trip is exact
    assert case.pre.shape == tuple(2 * (b - a) for a, b in case.crop)
  out = tmp_path / "pred.nii.gz"
  geometry.save_label_map(case.label, case, out)
  written, source = nib.load(out), nib.load(files.label)
  assert written.shape == source.shape and written.get_data_dtype() == np.uint8
  np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj))


def test_canonical_shape_matches_nibabel(tmp_path):
  root = write_breast(tmp_path / "mama", n=1)
  img = nib.load(breast.find_cases(root)[0].pre)
  assert geometry.canonical_shape(img.affine, img.shape) == nib.as_closest_canonical(img).shape
