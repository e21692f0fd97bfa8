import numpy as np
import pytest

from resfuse_jax.evaluation import metrics


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


def test_precision_hand_cases():
  assert metrics.precision(mask(S), mask(S, np.s_[0, 0, 0])) == 1.0
  assert metrics.precision(mask(S, np.s_[0:4, 0, 0]), mask(S, np.s_[0:1, 0, 0])) == 0.25


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


def cube(shape, corner, size):
  m = np.zeros(shape, bool)
  m[tuple(slice(c, c + size) for c in corner)] = True
  return m


L = (40, 40, 40)


def test_lesion_wise_both_empty_and_false_positive_only():
  assert metrics.lesion_wise(np.zeros(L), np.zeros(L)) == {
    "dice": 1.0,
    "hd95": 0.0,
    "lesions": 0,
    "false_positives": 0,
  }
  out = metrics.lesion_wise(cube(L, (5, 5, 5), 4), np.zeros(L))
  assert out["dice"] == 0.0 and out["hd95"] == metrics.EMPTY_HD95 and out["false_positives"] == 1


def test_lesion_wise_perfect_and_missed_lesions():
  ref = cube(L, (5, 5, 5), 4) | cube(L, (25, 25, 25), 4)  # two 64-voxel lesions, far apart
  assert metrics.lesion_wise(ref, ref)["dice"] == 1.0
  only_first = metrics.lesion_wise(cube(L, (5, 5, 5), 4), ref)
  assert only_first["lesions"] == 2 and only_first["dice"] == pytest.approx(0.5)
  assert only_first["hd95"] == pytest.approx(metrics.EMPTY_HD95 / 2)
  assert metrics.lesion_wise(np.zeros(L), ref)["dice"] == 0.0


def test_lesion_wise_false_positive_component_counts_as_a_lesion():
  ref = cube(L, (5, 5, 5), 4)
  pred = ref | cube(L, (30, 30, 30), 2)
  out = metrics.lesion_wise(pred, ref)
  assert out["false_positives"] == 1 and out["dice"] == pytest.approx(0.5)
  assert out["hd95"] == pytest.approx(metrics.EMPTY_HD95 / 2)
  assert metrics.dice(pred, ref) > 0.8  # voxel Dice barely notices the false positive


def test_lesion_wise_dilation_merges_close_lesions():
  ref = cube(L, (5, 5, 5), 4) | cube(L, (5, 5, 13), 4)  # 4-voxel gap: merged by dilation 3
  out = metrics.lesion_wise(ref, ref)
  assert out["lesions"] == 1 and out["dice"] == 1.0
  far = cube(L, (5, 5, 5), 4) | cube(L, (5, 5, 25), 4)
  assert metrics.lesion_wise(far, far)["lesions"] == 2


def test_lesion_wise_ignores_small_lesions_and_predictions_on_them():
  ref = cube(L, (5, 5, 5), 4) | cube(L, (30, 30, 30), 3)  # 64 voxels, and 27 < 50 ignored
  out = metrics.lesion_wise(ref, ref)
  assert out["lesions"] == 1 and out["false_positives"] == 0 and out["dice"] == 1.0
  missed_small = metrics.lesion_wise(cube(L, (5, 5, 5), 4), ref)
  assert missed_small["dice"] == 1.0


def test_lesion_rules_in_mm_are_the_voxel_rules_on_a_1mm_grid():
  """3 mm is 3 iterations of the 26-connected dilation at 1 mm; 50 mm³ is 50 voxels."""
  from scipy import ndimage

  assert metrics.dilation_radius((1.0, 1.0, 1.0)) == (3, 3, 3)
  assert metrics.dilation_radius((2.0, 0.5, 1.5)) == (1, 6, 2)
  rng = np.random.default_rng(0)
  for k in (1, 2, 3):
    seeds = rng.random((18, 21, 15)) < 0.01
    seeds[0, 0, 0] = seeds[-1, 10, -1] = True  # at the faces: clipped alike
    old = ndimage.binary_dilation(seeds, np.ones((3, 3, 3), bool), iterations=k)
    np.testing.assert_array_equal(metrics.dilate_box(seeds, (k, k, k)), old)
  big = cube(L, (5, 5, 5), 4)
  for size, counted in ((49, False), (50, True)):
    satellite = mask(L, np.s_[30:40, 30:35, 30])  # 50 voxels
    satellite[39, 34, 30] = size == 50
    out = metrics.lesion_wise(big, big | satellite)  # the satellite missed
    assert out["lesions"] == 1 + counted and out["dice"] == (0.5 if counted else 1.0)


def test_lesion_rules_keep_their_physical_size_on_a_2mm_grid():
  """At 2 mm a voxel holds 8 mm³ and the dilation reaches one voxel, not three."""
  two = (2.0, 2.0, 2.0)
  voxel_rule = {"dilation_mm": 6.0, "min_lesion_mm3": 400.0}  # 3 and 50 voxels of 2 mm
  big = cube(L, (5, 5, 5), 4)
  for length, counted in ((6, False), (7, True)):  # 48 mm³ and 56 mm³
    ref = big | mask(L, np.s_[30 : 30 + length, 30, 30])
    out = metrics.lesion_wise(big, ref, two)  # the satellite missed
    assert out["lesions"] == 1 + counted and out["dice"] == (0.5 if counted else 1.0)
    assert metrics.lesion_wise(big, ref, two, **voxel_rule)["lesions"] == 1  # too small in voxels
  gap4 = cube(L, (5, 5, 5), 4) | cube(L, (5, 5, 13), 4)  # 4 voxels apart: 8 mm at 2 mm
  assert metrics.lesion_wise(gap4, gap4, two)["lesions"] == 2
  assert metrics.lesion_wise(gap4, gap4, two, **voxel_rule)["lesions"] == 1
  assert metrics.lesion_wise(gap4, gap4)["lesions"] == 1  # 4 mm apart at 1 mm: merged


def test_region_metrics_report_the_packages_rules_leaving_out_empty_cases():
  ref = np.zeros((12, 12, 12, 1), bool)
  ref[2:6, 2:6, 2:6] = True
  pred = np.zeros_like(ref)
  pred[2:6, 2:6, 3:6] = True
  acc = metrics.RegionMetrics(["lesion"], lesion_wise=True)
  row = acc.add("a", pred, ref, (1.0, 1.0, 1.0))
  acc.add("empty", np.zeros_like(ref), np.zeros_like(ref), (1.0, 1.0, 1.0))
  assert row["pkg_lesion_dice_lesion"] == pytest.approx(2 * 48 / (48 + 64))
  summary = acc.summary()
  assert summary["pkg_lesion_dice"]["lesion"] == row["pkg_lesion_dice_lesion"]  # NaN left out
  assert summary["lesion_dice"]["lesion"] == pytest.approx((row["lesion_dice_lesion"] + 1.0) / 2)
  assert acc.std()["pkg_lesion_f1"]["lesion"] == 0.0
