"""Dice and HD95 against MONAI's independent implementations, on random 3D masks."""

import numpy as np
import pytest
from scipy import ndimage

from resfuse_jax.evaluation import metrics

torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")


def random_mask(seed, shape=(24, 28, 20)):
  field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
  mask = field > np.percentile(field, 80)
  mask[:2], mask[-2:], mask[:, :2], mask[:, -2:], mask[..., :2], mask[..., -2:] = (False,) * 6
  return mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.5, 2.0)])
def test_dice_and_hd95_match_monai(seed, spacing):
  pred, ref = random_mask(seed), random_mask(100 + seed)
  if seed % 3 == 0:  # also overlapping, similar masks
    ref = ndimage.binary_dilation(pred, iterations=1)

  def t(m):
    return torch.from_numpy(m[None, None].astype(np.float32))

  monai_dice = monai_metrics.compute_dice(t(pred), t(ref), include_background=True).item()
  monai_hd95 = monai_metrics.compute_hausdorff_distance(
    t(pred), t(ref), include_background=True, percentile=95, spacing=spacing
  ).item()
  assert metrics.dice(pred, ref) == pytest.approx(monai_dice, rel=1e-5)
  assert metrics.hd95(pred, ref, spacing) == pytest.approx(monai_hd95, rel=1e-5)
