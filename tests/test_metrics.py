import numpy as np
import pytest

from resfuse_jax import metrics


def mask(shape, *boxes):
  m = np.zeros(shape, bool)
  for b in boxes:
    m[b] = True
  return m


S = (10, 10, 10)


@pytest.mark.parametrize(
  "pred,ref,expected",
  [
    (mask(S), mask(S), 1.0),  # both empty
    (mask(S, np.s_[1, 1, 1]), mask(S), 0.0),  # empty reference
    (mask(S), mask(S, np.s_[1, 1, 1]), 0.0),  # empty prediction
    (mask(S, np.s_[1, 1, 1]), mask(S, np.s_[1, 1, 1]), 1.0),  # one voxel
    (mask(S, np.s_[0:2, 0, 0]), mask(S, np.s_[1:3, 0, 0]), 0.5),  # 2*1 / (2+2)
    (mask(S, np.s_[0:4, 0, 0]), mask(S, np.s_[0:2, 0, 0]), 2 * 2 / 6),
  ],
)
def test_dice_hand_cases(pred, ref, expected):
  assert metrics.dice(pred, ref) == pytest.approx(expected)


def test_recall_hand_cases():
  assert metrics.recall(mask(S), mask(S)) == 1.0
  assert metrics.recall(mask(S, np.s_[0, 0, 0]), mask(S)) == 1.0
  assert metrics.recall(mask(S), mask(S, np.s_[0, 0, 0])) == 0.0
  assert metrics.recall(mask(S, np.s_[0:2, 0, 0]), mask(S, np.s_[0:4, 0, 0])) == 0.5


def test_hd95_empty_conventions():
  assert metrics.hd95(mask(S), mask(S)) == 0.0
  assert metrics.hd95(mask(S, np.s_[0, 0, 0]), mask(S)) == metrics.EMPTY_HD95
  assert metrics.hd95(mask(S), mask(S, np.s_[0, 0, 0])) == metrics.EMPTY_HD95


def test_hd95_single_voxels_uses_spacing():
  a, b = mask(S, np.s_[1, 1, 1]), mask(S, np.s_[1, 1, 4])
  assert metrics.hd95(a, b) == pytest.approx(3.0)
  assert metrics.hd95(a, b, spacing=(1.0, 1.0, 2.5)) == pytest.approx(7.5)


def test_hd95_identical_masks_is_zero():
  m = mask(S, np.s_[2:6, 3:7, 1:5])
  assert metrics.hd95(m, m) == 0.0


def test_hd95_shifted_cube():
  a = mask((20, 20, 20), np.s_[5:10, 5:10, 5:10])
  b = mask((20, 20, 20), np.s_[7:12, 5:10, 5:10])
  assert metrics.hd95(a, b) == pytest.approx(2.0)


def test_region_metrics_summary():
  acc = metrics.RegionMetrics(["A", "B"])
  ref = np.stack([mask(S, np.s_[0:2, 0, 0]), mask(S)], -1)
  acc.add("c1", ref, ref, (1, 1, 1))
  acc.add("c2", np.zeros_like(ref), ref, (1, 1, 1))
  out = acc.summary()
  assert out["dice"] == {"A": 0.5, "B": 1.0, "mean": 0.75}
  assert out["recall"]["A"] == 0.5
  assert out["hd95"]["A"] == pytest.approx(metrics.EMPTY_HD95 / 2)
  with pytest.raises(ValueError):
    metrics.RegionMetrics(["A"]).summary()
