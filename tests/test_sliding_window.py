import numpy as np
import pytest

from resfuse_jax.inference import tiler


def test_gaussian_peak_and_positivity():
  g = tiler.gaussian_importance((8, 8, 8))
  assert g.max() == pytest.approx(1.0) and g.min() > 0
  assert g[3:5, 3:5, 3:5].min() == g.max()


@pytest.mark.parametrize("shape", [(20, 33, 17), (16, 16, 16), (5, 40, 9)])
def test_windows_cover_every_voxel(shape):
  window = (16, 16, 16)
  padded = tuple(max(s, w) for s, w in zip(shape, window))
  covered = np.zeros(padded, int)
  for s in tiler.window_starts(padded, window, 0.5):
    covered[tuple(slice(a, a + w) for a, w in zip(s, window))] += 1
    assert all(a + w <= p for a, w, p in zip(s, window, padded))
  assert covered.min() >= 1


def test_single_window_equals_one_forward_pass():
  rng = np.random.default_rng(0)
  vol = rng.normal(size=(8, 8, 8, 2)).astype(np.float32)
  w = rng.normal(size=(2, 3)).astype(np.float32)

  def predict(tiles):
    return tiles @ w

  out = tiler.sliding_window(predict, vol, (8, 8, 8), batch_size=2)
  np.testing.assert_allclose(out, vol @ w, rtol=1e-5, atol=1e-6)


def test_voxelwise_function_is_reproduced_on_larger_volume():
  """Overlapping windows of a voxel-wise function average to the function itself."""
  vol = np.random.default_rng(1).normal(size=(21, 13, 30, 2)).astype(np.float32)
  out = tiler.sliding_window(lambda t: t[..., :1] * 2.0, vol, (8, 8, 8), batch_size=3)
  assert out.shape == (21, 13, 30, 1)
  np.testing.assert_allclose(out[..., 0], vol[..., 0] * 2.0, rtol=1e-5, atol=1e-5)


def test_predict_is_always_called_with_a_full_batch():
  seen = []

  def predict(tiles):
    seen.append(tiles.shape[0])
    return tiles[..., :1]

  tiler.sliding_window(predict, np.ones((20, 20, 20, 1), np.float32), (8, 8, 8), batch_size=4)
  assert set(seen) == {4}


def test_mirroring_tta_of_a_flip_equivariant_function_is_exact():
  vol = np.random.default_rng(2).normal(size=(12, 10, 9, 2)).astype(np.float32)

  def blur(tiles):  # symmetric 3-tap box along each axis: flip-equivariant
    out = tiles[..., :1].copy()
    for axis in (1, 2, 3):
      out = (np.roll(out, 1, axis) + out + np.roll(out, -1, axis)) / 3
    return out

  plain = tiler.sliding_window(blur, vol, (12, 10, 9), batch_size=1)
  tta = tiler.sliding_window(blur, vol, (12, 10, 9), batch_size=1, mirror_axes=(0, 1, 2))
  np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-6)


def test_mirroring_tta_averages_a_non_equivariant_function():
  vol = np.zeros((8, 8, 8, 1), np.float32)
  ramp = np.arange(8, dtype=np.float32)[None, :, None, None, None]

  def predict(tiles):  # depends on position along axis 0 only: flips average it out
    return np.broadcast_to(ramp, tiles.shape).copy()

  tta = tiler.sliding_window(predict, vol, (8, 8, 8), batch_size=1, mirror_axes=(0,))
  np.testing.assert_allclose(tta[..., 0], np.full((8, 8, 8), 3.5), atol=1e-6)
  with pytest.raises(ValueError, match="mirror_axes"):
    tiler.sliding_window(predict, vol, (8, 8, 8), batch_size=1, mirror_axes=(3,))


@pytest.mark.parametrize(
  "shape, batch, mirror_axes",
  [((21, 13, 30), 3, ()), ((6, 8, 8), 2, ()), ((21, 13, 30), 2, (0, 1, 2)), ((9, 12, 8), 4, (1,))],
)
def test_the_host_and_device_placements_give_the_same_probabilities(shape, batch, mirror_axes):
  """A window-position-dependent function, so the Gaussian blending of overlaps and the
  flips of mirroring must agree voxel by voxel."""
  import jax

  rng = np.random.default_rng(2)
  vol = rng.normal(size=(*shape, 2)).astype(np.float32)
  w = rng.normal(size=(2, 3)).astype(np.float32)
  pattern = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)  # not flip-symmetric

  window = tiler.JaxWindow(jax.jit(lambda p, t: jax.nn.sigmoid(t @ p + pattern)), w)
  kw = {"overlap": 0.5, "batch_size": batch, "mirror_axes": mirror_axes}
  host = tiler.sliding_window(window, vol, (8, 8, 8), placement="host", **kw)
  device = tiler.sliding_window(window, vol, (8, 8, 8), placement="device", **kw)
  assert host.shape == device.shape == (*shape, 3)
  np.testing.assert_allclose(device, host, rtol=0, atol=1e-5)
  plain = tiler.sliding_window(window, vol, (8, 8, 8), placement="host", overlap=0.5)
  assert mirror_axes == () or np.abs(plain - host).max() > 1e-3  # mirroring changed something


def test_auto_placement_is_the_backends_column_and_device_needs_a_jax_window(monkeypatch):
  from resfuse_jax import backend
  from resfuse_jax.errors import ConfigError

  window = tiler.JaxWindow(lambda p, t: t[..., :1] * p, 2.0)
  assert tiler.resolve_placement("auto", window) == backend.DEFAULTS["cpu"]["tiling"] == "host"
  monkeypatch.setitem(backend.DEFAULTS["cpu"], "tiling", "device")
  assert tiler.resolve_placement("auto", window) == "device"
  assert tiler.resolve_placement("auto", np.asarray) == "host"  # onnxruntime's, the heat map's
  with pytest.raises(ConfigError, match="JaxWindow"):
    tiler.sliding_window(np.asarray, np.ones((8, 8, 8, 1)), (8, 8, 8), placement="device")
  with pytest.raises(ConfigError, match="placement must be one of"):
    tiler.resolve_placement("gpu", window)


def test_what_the_window_function_returns_is_what_is_accumulated():
  """Any channel count (the fusion heat map's levels), on both placements."""
  import jax

  vol = np.random.default_rng(3).normal(size=(12, 9, 10, 2)).astype(np.float32)
  scale = np.arange(1, 6, dtype=np.float32)  # 5 output channels
  window = tiler.JaxWindow(jax.jit(lambda p, t: t[..., :1] * p), scale)
  for placement in ("host", "device"):
    out = tiler.sliding_window(window, vol, (8, 8, 8), overlap=0.0, placement=placement)
    assert out.shape == (12, 9, 10, 5)
    np.testing.assert_allclose(out, vol[..., :1] * scale, rtol=1e-5, atol=1e-5)
