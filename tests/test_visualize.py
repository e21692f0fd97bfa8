import numpy as np
import pytest

from resfuse_jax import visualize
from resfuse_jax.inference import predictor


def test_largest_lesion_slice_picks_the_big_lesion_centre():
  labels = np.zeros((20, 20, 30), np.uint8)
  labels[2:4, 2:4, 3:5] = 3  # small
  labels[8:14, 8:14, 18:25] = 2  # large, centred around z = 21
  z = visualize.largest_lesion_slice(labels)
  assert 18 <= z < 25
  assert visualize.largest_lesion_slice(np.zeros((4, 4, 6))) == 3


def test_overlay_uses_the_papers_colours():
  gray = np.linspace(0, 1, 16).reshape(4, 4)
  labels = np.zeros((4, 4), np.uint8)
  labels[0, 0], labels[0, 1], labels[0, 2] = 3, 1, 2
  rgb = visualize.overlay(gray, labels, visualize.BRATS_COLOURS, alpha=1.0)
  np.testing.assert_allclose(rgb[0, 0], (1, 0, 0))  # ET red
  np.testing.assert_allclose(rgb[0, 1], (0, 1, 0))  # NCR green (TC = red + green)
  assert rgb[0, 2, 2] == pytest.approx(1.0)  # edema blue (WT = red + green + blue)
  assert np.allclose(rgb[3, 3], rgb[3, 3, 0])  # unlabelled stays grey


def test_fusion_heat_map_scales_each_level_to_one():
  mags = np.zeros((2, 4, 4, 4), np.float32)
  mags[0, 1, 1, 1] = 10.0
  mags[1, 2, 2, 2] = 0.5
  heat = predictor.fusion_heat_map(mags)
  assert heat[1, 1, 1] == pytest.approx(0.5) and heat[2, 2, 2] == pytest.approx(0.5)
  assert heat.max() == pytest.approx(0.5)


def test_case_figure_writes_a_png(tmp_path):
  rng = np.random.default_rng(0)
  pre = rng.normal(size=(16, 16, 8)).astype(np.float32)
  labels = np.zeros((16, 16, 8), np.uint8)
  labels[4:8, 4:8, 2:5] = 3
  z = visualize.case_figure(
    tmp_path / "f" / "c.png", "c", pre, pre + labels, labels, labels, heat=np.abs(pre)
  )
  assert (tmp_path / "f" / "c.png").stat().st_size > 1000 and 2 <= z < 5
