import grain
import numpy as np
import pytest

from resfuse_jax.data import brats, pipeline
from resfuse_jax.data.common import Case

PATCH = (16, 16, 16)
NO_AUGMENT = pipeline.Augment(flip=False, rot90=False, intensity=False)
FLIPS = pipeline.Augment(flip=True, rot90=False, intensity=False)


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
  sampler = pipeline.PairedPatchSampler(
    cases, PATCH, brats.REGIONS, fg_fraction, augment=NO_AUGMENT
  )
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
  sampler = pipeline.PairedPatchSampler(small_cases, PATCH, brats.REGIONS, 1.0, augment=NO_AUGMENT)
  rng = np.random.default_rng(1)
  centres = [sampler.random_map(i % len(small_cases), rng)["label"][8, 8, 8] for i in range(600)]
  et_share = np.mean(np.array(centres) == 3)
  cases_with_et = np.mean([(c.label == 3).any() for c in small_cases])
  assert et_share > 0.2 * cases_with_et  # ET is 1 of 3 regions; its voxel share is far below that


def test_flips_keep_pre_post_label_aligned(small_cases):
  sampler = pipeline.PairedPatchSampler(small_cases[:1], PATCH, brats.REGIONS, 1.0, augment=FLIPS)
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


def coded_case(size=(40, 36, 30)):
  """pre = label code, post = 2 * pre + 1 inside the head: alignment is checkable per voxel."""
  rng = np.random.default_rng(3)
  label = rng.integers(0, 4, size=size).astype(np.uint8)
  label = np.repeat(np.repeat(label[::4, ::4, ::3], 4, 0), 4, 1).repeat(3, 2)[
    : size[0], : size[1], : size[2]
  ]
  pre = label.astype(np.float32) + 1.0
  post = 2.0 * pre + 1.0
  return Case("coded", pre, post, label, (1.0,) * 3, np.eye(4), size, ((0, s) for s in size))


@pytest.mark.parametrize(
  "augment",
  [
    pipeline.Augment(flip=True, rot90=False, intensity=False),
    pipeline.Augment(flip=False, rot90=True, intensity=False),
    pipeline.Augment(flip=True, rot90=True, rot90_axes=(1, 2), intensity=False),
    pipeline.Augment(flip=True, rot90=True, intensity=True),
  ],
)
def test_pre_post_label_stay_aligned_after_exact_augmentations(augment):
  sampler = pipeline.PairedPatchSampler(
    [coded_case()], (16, 12, 8), brats.REGIONS, 0.5, augment=augment
  )
  rng = np.random.default_rng(0)
  for _ in range(30):
    out = sampler.random_map(0, rng)
    pre, post, label = out["pre"][..., 0], out["post"][..., 0], out["label"]
    assert pre.shape == (16, 12, 8) and label.shape == (16, 12, 8)
    # post = 2 pre + 1 before a shared intensity map y = s x + b: still exactly linear.
    s_fit, b_fit = np.polyfit(pre.ravel(), post.ravel(), 1)
    np.testing.assert_allclose(post, s_fit * pre + b_fit, atol=1e-4)
    # and the label still codes pre: one pre value per label value.
    for v in np.unique(label):
      assert np.ptp(pre[label == v]) < 1e-4


def test_intensity_augmentation_keeps_enhancement_sign():
  sampler = pipeline.PairedPatchSampler(
    [coded_case()],
    (16, 12, 8),
    brats.REGIONS,
    0.5,
    augment=pipeline.Augment(flip=False, rot90=False, intensity=True, intensity_scale=0.3),
  )
  rng = np.random.default_rng(1)
  for _ in range(30):
    out = sampler.random_map(0, rng)
    assert (out["post"] > out["pre"]).all()  # post > pre everywhere in the source


def test_small_rotation_and_scaling_keep_alignment():
  augment = pipeline.Augment(
    flip=False, rot90=False, intensity=False, rotate_degrees=15, scale_range=(0.85, 1.15)
  )
  sampler = pipeline.PairedPatchSampler(
    [coded_case()], (16, 16, 8), brats.REGIONS, 0.5, augment=augment
  )
  rng = np.random.default_rng(2)
  for _ in range(10):
    out = sampler.random_map(0, rng)
    pre, post, label = out["pre"][..., 0], out["post"][..., 0], out["label"]
    assert pre.shape == (16, 16, 8)
    head = pre != 0
    np.testing.assert_allclose(post[head], 2 * pre[head] + 1, atol=1e-4)  # linear interp commutes
    # Inside label blocks (interpolated code still an integer) nearest labels must match it.
    inside = head & (np.abs(pre - np.round(pre)) < 1e-3)
    assert inside.sum() > 200
    assert (label[inside] + 1 == np.round(pre[inside])).mean() > 0.98


def test_workers_give_the_same_batches(small_cases):
  a = take(make(small_cases, seed=4), 2)
  b = take(make(small_cases, seed=4, workers=2), 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["post"], y["post"])


def test_process_shards_split_the_case_stream(small_cases):
  """Each JAX process reads its own slice of the shuffled case stream."""

  def case_stream(index, count):
    ds = grain.MapDataset.range(len(small_cases)).seed(0).shuffle().repeat()
    return list(ds[index::count][:12])

  full = list(grain.MapDataset.range(len(small_cases)).seed(0).shuffle().repeat()[:24])
  assert case_stream(0, 2) == full[0::2] and case_stream(1, 2) == full[1::2]
  a = take(make(small_cases, shard_index=0, shard_count=2), 2)
  b = take(make(small_cases, shard_index=1, shard_count=2), 2)
  assert not np.array_equal(a[0]["post"], b[0]["post"])


def test_process_shards_together_give_the_single_process_batches(small_cases):
  """Two processes with local batch 1 hold rows 0 and 1 of the one-process batch of 2,
  augmentation included, so a multi-host run trains on exactly the same global batches."""
  single = take(make(small_cases, batch_size=2), 3)
  shards = [take(make(small_cases, batch_size=1, shard_index=p, shard_count=2), 3) for p in (0, 1)]
  for step, batch in enumerate(single):
    for key in ("pre", "post", "label"):
      rows = np.concatenate([shards[0][step][key], shards[1][step][key]])
      np.testing.assert_array_equal(rows, batch[key])
