import numpy as np

from resfuse_jax.data import brats
from resfuse_jax.inference import postprocess


def test_region_label_values():
  assert postprocess.region_label_values(brats.REGIONS) == [2, 1, 3]
  assert postprocess.region_label_values({"lesion": (1,)}) == [1]


def test_probabilities_to_labels_paints_nested_regions():
  probs = np.zeros((6, 6, 6, 3), np.float32)
  probs[0:3, 0:3, 0:3, 0] = 0.9  # WT
  probs[0:2, 0:2, 0:2, 1] = 0.9  # TC
  probs[0, 0, 0, 2] = 0.9  # ET
  labels = postprocess.probabilities_to_labels(probs, brats.REGIONS)
  assert labels[0, 0, 0] == 3 and labels[1, 1, 1] == 1 and labels[2, 2, 2] == 2
  assert labels[3, 3, 3] == 0
  high = postprocess.probabilities_to_labels(probs, brats.REGIONS, thresholds=[0.95, 0.5, 0.5])
  assert high[2, 2, 2] == 0
  probs[5, 5, 5, 0] = 0.9  # an isolated one-voxel WT component
  pruned = postprocess.probabilities_to_labels(probs, brats.REGIONS, min_component_voxels=2)
  assert pruned[5, 5, 5] == 0 and pruned[2, 2, 2] == 2


def test_region_masks_are_the_nested_references():
  label = np.array([0, 1, 2, 3], np.uint8).reshape(4, 1, 1)
  masks = postprocess.region_masks(label, brats.REGIONS)
  assert masks.shape == (4, 1, 1, 3) and masks.dtype == bool
  np.testing.assert_array_equal(masks[:, 0, 0], [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
  np.testing.assert_array_equal(postprocess.masks_to_labels(masks, brats.REGIONS), label)
