import numpy as np

from resfuse_jax.data import brats, pipeline
from resfuse_jax.data.common import Case

PATCH = (16, 16, 16)


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def make(cases, fg_fraction=1 / 3, seed=0, batch_size=2, **kw):
  return pipeline.train_dataset(
    cases,
    patch_size=PATCH,
    batch_size=batch_size,
    regions=brats.REGIONS,
    fg_fraction=fg_fraction,
    seed=seed,
    **kw,
  )


def test_batch_shapes_and_dtypes(small_cases):
  (batch,) = take(make(small_cases), 1)
  assert batch["pre"].shape == (2, *PATCH, 1) and batch["pre"].dtype == np.float32
  assert batch["post"].shape == (2, *PATCH, 1) and batch["post"].dtype == np.float32
  assert batch["label"].shape == (2, *PATCH) and batch["label"].dtype == np.uint8


def test_deterministic_for_a_seed(small_cases):
  a, b = take(make(small_cases, seed=5), 3), take(make(small_cases, seed=5), 3)
  c = take(make(small_cases, seed=6), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["post"], y["post"])
  assert not all(np.array_equal(x["post"], z["post"]) for x, z in zip(a, c))


def blob_case(size=64):
  """A big volume whose only tumour is a 4^3 cube, so uniform patches rarely hold it."""
  label = np.zeros((size,) * 3, np.uint8)
  label[40:44, 10:14, 50:54] = 3
  img = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
  return Case(
    "blob", img, img + (label > 0), label, (1.0,) * 3, np.eye(4), label.shape, ((0, size),) * 3
  )


def fraction_with_foreground(cases, fg_fraction, n=600, seed=0):
  sampler = pipeline.PairedPatchSampler(cases, PATCH, brats.REGIONS, fg_fraction, flip=False)
  rng = np.random.default_rng(seed)
  hits = [sampler.random_map(i % len(cases), rng)["label"].any() for i in range(n)]
  return float(np.mean(hits))


def test_foreground_fraction():
  """Oversampled patches always hold tumour; the rest hold it at the uniform rate."""
  cases = [blob_case()]
  uniform = fraction_with_foreground(cases, 0.0)
  assert uniform < 0.2
  assert fraction_with_foreground(cases, 1.0) == 1.0
  expected = 1 / 3 + (2 / 3) * uniform
  assert abs(fraction_with_foreground(cases, 1 / 3, seed=1) - expected) < 0.06


def test_small_regions_are_sampled_as_often_as_large_ones(small_cases):
  sampler = pipeline.PairedPatchSampler(small_cases, PATCH, brats.REGIONS, 1.0, flip=False)
  rng = np.random.default_rng(1)
  centres = [sampler.random_map(i % len(small_cases), rng)["label"][8, 8, 8] for i in range(600)]
  et_share = np.mean(np.array(centres) == 3)
  cases_with_et = np.mean([(c.label == 3).any() for c in small_cases])
  assert et_share > 0.2 * cases_with_et  # ET is 1 of 3 regions; its voxel share is far below that


def test_flips_keep_pre_post_label_aligned(small_cases):
  sampler = pipeline.PairedPatchSampler(small_cases[:1], PATCH, brats.REGIONS, 1.0, flip=True)
  case = small_cases[0]
  rng = np.random.default_rng(2)
  for _ in range(20):
    out = sampler.random_map(0, rng)
    # The pre->post and label relation of the source survives: ET voxels enhance.
    et = out["label"] == 3
    if et.any():
      diff = out["post"][..., 0] - out["pre"][..., 0]
      assert diff[et].mean() > diff[out["label"] == 0].mean() + 0.5
  assert case.pre.shape[0] >= PATCH[0]


def test_volume_smaller_than_patch_is_padded(small_cases):
  sampler = pipeline.PairedPatchSampler(small_cases[:1], (64, 64, 64), brats.REGIONS, 0.5)
  out = sampler.random_map(0, np.random.default_rng(0))
  assert out["pre"].shape == (64, 64, 64, 1) and out["label"].shape == (64, 64, 64)
