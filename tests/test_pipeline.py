import grain
import numpy as np
import pytest

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
  sampler = pipeline.PairedPatchSampler(cases, PATCH, brats.REGIONS, fg_fraction)
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
  sampler = pipeline.PairedPatchSampler(small_cases, PATCH, brats.REGIONS, 1.0)
  rng = np.random.default_rng(1)
  centres = [sampler.random_map(i % len(small_cases), rng)["label"][8, 8, 8] for i in range(600)]
  et_share = np.mean(np.array(centres) == 3)
  cases_with_et = np.mean([(c.label == 3).any() for c in small_cases])
  assert et_share > 0.2 * cases_with_et  # ET is 1 of 3 regions; its voxel share is far below that


def test_volume_smaller_than_patch_is_padded(small_cases):
  sampler = pipeline.PairedPatchSampler(small_cases[:1], (64, 64, 64), brats.REGIONS, 0.5)
  out = sampler.random_map(0, np.random.default_rng(0))
  assert out["pre"].shape == (64, 64, 64, 1) and out["label"].shape == (64, 64, 64)


def coded_case(size=(40, 36, 30)):
  """pre codes each voxel's position: a crop's place in the volume is readable from it."""
  grid = np.indices(size)
  pre = (1 + grid[0] * 10_000 + grid[1] * 100 + grid[2]).astype(np.float32)
  label = (grid.sum(0) % 4).astype(np.uint8)
  return Case("coded", pre, 2 * pre, label, (1.0,) * 3, np.eye(4), size, ((0, s) for s in size))


def test_the_crop_is_the_patch_window_grown_by_the_margin():
  """The centre of a crop is exactly the patch the no-margin sampler cuts from the same draw."""
  case = coded_case()
  patch, crop = (16, 12, 8), (26, 20, 14)
  plain = pipeline.PairedPatchSampler([case], patch, brats.REGIONS, 0.5)
  margin = pipeline.PairedPatchSampler([case], patch, brats.REGIONS, 0.5, crop_shape=crop)
  for seed in range(20):
    a = plain.random_map(0, np.random.default_rng(seed))
    b = margin.random_map(0, np.random.default_rng(seed))
    assert b["pre"].shape == (*crop, 1) and b["label"].shape == crop
    inner = tuple(slice((c - p) // 2, (c - p) // 2 + p) for c, p in zip(crop, patch))
    for key in ("pre", "post", "label"):
      np.testing.assert_array_equal(b[key][inner], a[key])


def test_a_crop_leaving_the_volume_is_zero_there_and_the_volume_elsewhere():
  case = coded_case()
  sampler = pipeline.PairedPatchSampler(
    [case], (16, 12, 8), brats.REGIONS, 0.5, crop_shape=(26, 20, 14)
  )
  out = sampler._cut(case, np.array([0, 0, 29]))  # patch window at the volume's corner
  pre = out["pre"]
  assert (pre[:5] == 0).all() and (pre[:, :4] == 0).all() and (pre[:, :, -3:] == 0).all()
  # crop voxel (5, 4, 3) is volume voxel (0, 0, 22 - 3 + 3): window start 22, margin 3.
  assert pre[5, 4, 3] == case.pre[0, 0, 22 - 3 + 3] and pre[5, 4, 0] == case.pre[0, 0, 19]
  np.testing.assert_array_equal(out["label"][5:, 4:, :11], case.label[:21, :16, 19:])


def test_a_crop_that_cannot_centre_the_patch_is_rejected():
  with pytest.raises(ValueError, match="even margin"):
    pipeline.PairedPatchSampler([coded_case()], (16, 12, 8), brats.REGIONS, 0.5, (25, 12, 8))


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
  """Two processes with local batch 1 hold rows 0 and 1 of the one-process batch of 2
  (augmentation then draws by global row, on the device), so a multi-host run trains on exactly the same global batches."""
  single = take(make(small_cases, batch_size=2), 3)
  shards = [take(make(small_cases, batch_size=1, shard_index=p, shard_count=2), 3) for p in (0, 1)]
  for step, batch in enumerate(single):
    for key in ("pre", "post", "label"):
      rows = np.concatenate([shards[0][step][key], shards[1][step][key]])
      np.testing.assert_array_equal(rows, batch[key])


def test_the_stream_holds_only_a_bounded_number_of_crops_ahead(small_cases, monkeypatch):
  """A slow step must not let the reader run ahead without bound (Grain's default is 500)."""
  import threading
  import time

  calls, lock = [0], threading.Lock()
  cut = pipeline.PairedPatchSampler.random_map

  def counted(self, index, rng):
    with lock:
      calls[0] += 1
    return cut(self, index, rng)

  monkeypatch.setattr(pipeline.PairedPatchSampler, "random_map", counted)
  it = iter(make(small_cases, batch_size=2, prefetch=6, read_threads=2))
  next(it)
  time.sleep(1.0)  # a consumer far slower than the reader
  assert 2 <= calls[0] <= 2 + 6 + 2  # one batch taken, at most `prefetch` ahead (+ one in flight)
