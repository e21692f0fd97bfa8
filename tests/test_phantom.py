import json

import nibabel as nib
import numpy as np
import pytest

from resfuse_jax.data import brats, phantom
from resfuse_jax.evaluation import metrics

SUFFIXES = ("t1n", "t1c", "t2w", "t2f", "seg")


def test_deterministic_per_seed_and_different_across_seeds():
  spec = phantom.PhantomSpec(num_cases=2, shape=(32, 32, 32), seed=7)
  a, b = phantom.make_case(spec, 1), phantom.make_case(spec, 1)
  for k in SUFFIXES:
    np.testing.assert_array_equal(a[k], b[k])
  other = phantom.make_case(phantom.PhantomSpec(num_cases=2, shape=(32, 32, 32), seed=8), 1)
  assert not np.array_equal(a["t1c"], other["t1c"])
  assert not np.array_equal(a["t1c"], phantom.make_case(spec, 0)["t1c"])


def test_written_in_brats_2023_layout_and_read_back(small_phantom, small_cases):
  root, spec = small_phantom
  cases = brats.find_cases(root)
  assert [c.case_id for c in cases] == [phantom.case_id(i) for i in range(spec.num_cases)]
  cid = cases[0].case_id
  for suffix in SUFFIXES:
    img = nib.load(root / cid / f"{cid}-{suffix}.nii.gz")
    assert img.shape == spec.shape
    np.testing.assert_allclose(np.diag(img.affine)[:3], [spec.spacing] * 3)
  seg = np.asarray(nib.load(root / cid / f"{cid}-seg.nii.gz").dataobj)
  np.testing.assert_array_equal(seg, phantom.make_case(spec, 0)["seg"])
  assert json.loads((root / phantom.MARKER).read_text()) == spec.key()
  assert small_cases[0].spacing == (spec.spacing,) * 3


def test_rewriting_with_another_spec_is_refused(small_phantom):
  root, spec = small_phantom
  with pytest.raises(ValueError, match="different spec"):
    phantom.write_phantom(root, phantom.PhantomSpec(num_cases=3, shape=(32, 32, 32), seed=3))


def test_labels_and_tumour_patterns():
  spec = phantom.PhantomSpec(num_cases=20, shape=(40, 40, 40), seed=0)
  kinds = set()
  for i in range(spec.num_cases):
    seg = phantom.make_case(spec, i)["seg"]
    assert set(np.unique(seg)) <= {0, 1, 2, 3}
    assert (seg == 2).any()  # every tumour has edema
    has_et, has_ncr = (seg == 3).any(), (seg == 1).any()
    kinds.add("ring" if has_et and has_ncr else "solid" if has_et else "nonenhancing")
  assert kinds == {"ring", "solid", "nonenhancing"}


def _zscore(x):
  m = x > 0
  return np.where(m, (x - x[m].mean()) / x[m].std(), 0)


def test_phantom_needs_the_pre_contrast_scan():
  """Best-threshold ET Dice: the subtraction post-pre beats the post scan alone by far."""
  spec = phantom.PhantomSpec(num_cases=10, shape=(48, 48, 48), seed=0)
  post_only, subtraction = [], []
  thresholds = np.linspace(0.0, 6.0, 49)
  for i in range(spec.num_cases):
    case = phantom.make_case(spec, i)
    et = case["seg"] == 3
    if not et.any():
      continue
    pre, post = _zscore(case["t1n"]), _zscore(case["t1c"])
    post_only.append(max(metrics.dice(post > t, et) for t in thresholds))
    subtraction.append(max(metrics.dice(post - pre > t, et) for t in thresholds))
  assert len(post_only) >= 5
  assert np.mean(subtraction) > 0.7
  assert np.mean(subtraction) - np.mean(post_only) > 0.25
