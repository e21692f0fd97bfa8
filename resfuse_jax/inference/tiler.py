"""Sliding-window inference over whole volumes (nnU-Net's Gaussian-weighted tiling)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from resfuse_jax import backend, data
from resfuse_jax.errors import ConfigError

SIGMA_SCALE = 1.0 / 8  # Gaussian tile weights: sigma = window * SIGMA_SCALE (nnU-Net's)


@functools.lru_cache(maxsize=8)
def gaussian_importance(window: tuple[int, ...], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
  """[d, h, w] weights, peak 1 at the centre, sigma = window * sigma_scale.

  The minimum is clamped above zero so every voxel of a window counts a little.
  """
  grids = np.meshgrid(*[np.arange(w, dtype=np.float64) for w in window], indexing="ij")
  g = np.ones(window, np.float64)
  for grid, w in zip(grids, window):
    g *= np.exp(-0.5 * ((grid - (w - 1) / 2) / (w * sigma_scale)) ** 2)
  g /= g.max()
  g = np.maximum(g, g[g > 0].min() if (g > 0).any() else 1e-6)
  return g.astype(np.float32)


def window_starts(shape: Sequence[int], window: Sequence[int], overlap: float) -> list[tuple]:
  """Start corners so that windows of ``window`` cover ``shape`` with the given overlap."""
  if not 0.0 <= overlap < 1.0:
    raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
  per_axis = []
  for size, win in zip(shape, window):
    if size <= win:
      per_axis.append([0])
      continue
    step = max(1, int(win * (1.0 - overlap)))
    n = int(np.ceil((size - win) / step)) + 1
    per_axis.append(sorted({int(round(x)) for x in np.linspace(0, size - win, n)}))
  return list(itertools.product(*per_axis))


def sliding_window(
  predict: Callable[[np.ndarray], np.ndarray],
  volume: np.ndarray,
  window: Sequence[int],
  num_outputs: int,
  overlap: float = 0.5,
  batch_size: int = 4,
  mirror_axes: Sequence[int] = (),
  fixed_batch: bool = True,
) -> np.ndarray:
  """Predicts a whole volume tile by tile.

  Args:
    predict: [n, *window, C] -> [n, *window, num_outputs] probabilities.
    volume: [D, H, W, C]; padded with zeros up to the window where smaller.
    mirror_axes: spatial axes (0-2) for mirroring test-time augmentation: every
      combination of flips is predicted, flipped back and averaged (2^k passes).
    fixed_batch: call ``predict`` with exactly ``batch_size`` tiles, zero tiles filling
      the last batch (a jitted function compiles once); False sends the last batch as
      it is (a runtime with a dynamic batch, onnxruntime, then computes no filler).

  Returns:
    [D, H, W, num_outputs] float32 probabilities, Gaussian-weighted averages.
  """
  window = tuple(int(w) for w in window)
  shape = volume.shape[:3]
  padded_shape = tuple(max(s, w) for s, w in zip(shape, window))
  pad = [(0, p - s) for p, s in zip(padded_shape, shape)] + [(0, 0)]
  vol = np.pad(volume, pad) if any(hi for _, hi in pad) else volume
  weights = gaussian_importance(window)[..., None]
  acc = np.zeros(padded_shape + (num_outputs,), np.float32)
  norm = np.zeros(padded_shape + (1,), np.float32)
  starts = window_starts(padded_shape, window, overlap)
  for i in range(0, len(starts), batch_size):
    chunk = starts[i : i + batch_size]
    n = batch_size if fixed_batch else len(chunk)
    tiles = np.zeros((n, *window, vol.shape[-1]), np.float32)
    for j, s in enumerate(chunk):
      tiles[j] = vol[tuple(slice(a, a + w) for a, w in zip(s, window))]
    probs = _predict_mirrored(predict, tiles, tuple(mirror_axes))
    for j, s in enumerate(chunk):
      sl = tuple(slice(a, a + w) for a, w in zip(s, window))
      acc[sl] += probs[j] * weights
      norm[sl] += weights
  out = acc / norm
  return out[: shape[0], : shape[1], : shape[2]]


def make_device_tiler(
  forward: Callable,
  shape: Sequence[int],
  window: Sequence[int],
  num_outputs: int,
  overlap: float = 0.5,
  batch_size: int = 4,
) -> Callable:
  """`sliding_window`'s tiling as one jitted program: (params, [D, H, W, C]) -> probabilities.

  Tiles are cut, predicted and Gaussian-accumulated on the device (a scan over
  batches of window corners), so only the volume goes in and the probabilities
  come out: on an accelerator the host's per-tile copies and numpy
  accumulation would cost more than the network. ``forward(params, tiles)``:
  [batch_size, *window, C] -> [batch_size, *window, num_outputs]. Compiled once
  per volume shape; padded corners of the last batch carry zero weight.
  """
  import jax
  import jax.numpy as jnp

  window = tuple(int(w) for w in window)
  spatial = tuple(int(s) for s in shape[:3])
  padded = tuple(max(s, w) for s, w in zip(spatial, window))
  starts = window_starts(padded, window, overlap)
  n_batches = -(-len(starts) // batch_size)
  extra = n_batches * batch_size - len(starts)
  corners = np.array(starts + [starts[-1]] * extra, np.int32).reshape(n_batches, batch_size, 3)
  valid = np.array([1.0] * len(starts) + [0.0] * extra, np.float32).reshape(n_batches, batch_size)
  weights = gaussian_importance(window)[..., None]

  def accumulate(array, corner, values):
    index = (*corner, 0)
    size = (*window, array.shape[-1])
    return jax.lax.dynamic_update_slice(
      array, jax.lax.dynamic_slice(array, index, size) + values, index
    )

  def run(params, volume):
    pad = [(0, p - s) for p, s in zip(padded, spatial)] + [(0, 0)]
    vol = jnp.pad(volume.astype(jnp.float32), pad)
    channels = vol.shape[-1]

    def body(carry, xs):
      acc, norm = carry
      batch_corners, batch_valid = xs
      tiles = jax.vmap(lambda c: jax.lax.dynamic_slice(vol, (*c, 0), (*window, channels)))(
        batch_corners
      )
      probs = forward(params, tiles).astype(jnp.float32)
      for j in range(batch_size):
        w = weights * batch_valid[j]
        acc = accumulate(acc, batch_corners[j], probs[j] * w)
        norm = accumulate(norm, batch_corners[j], w)
      return (acc, norm), None

    init = (
      jnp.zeros((*padded, num_outputs), jnp.float32),
      jnp.zeros((*padded, 1), jnp.float32),
    )
    (acc, norm), _ = jax.lax.scan(body, init, (corners, valid))
    return (acc / norm)[: spatial[0], : spatial[1], : spatial[2]]

  return jax.jit(run)


def _predict_mirrored(predict: Callable, tiles: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
  """Average of predictions over every subset of flipped spatial ``axes``."""
  if any(a not in (0, 1, 2) for a in axes):
    raise ValueError(f"mirror_axes must be spatial axes 0, 1, 2; got {axes}")
  total = None
  subsets = list(
    itertools.chain.from_iterable(itertools.combinations(axes, k) for k in range(len(axes) + 1))
  )
  for subset in subsets:
    flip = tuple(a + 1 for a in subset)  # skip the batch axis
    x = np.flip(tiles, flip) if flip else tiles
    y = np.asarray(predict(np.ascontiguousarray(x)))
    y = np.flip(y, flip) if flip else y
    total = y.astype(np.float32) if total is None else total + y
  return total / len(subsets)


def predict_volume(
  predict: Callable[[np.ndarray], np.ndarray],
  case: data.Case,
  config,
  batch_size: int | None = None,
  mirror_axes: Sequence[int] = (),
) -> np.ndarray:
  """A case's [D, H, W, R] region probabilities with the config's window and overlap.

  ``batch_size`` defaults to ``eval.batch_size`` (training rounds it up to the mesh).
  A ``predict`` with ``fixed_batch = False`` (`onnx_runtime.OnnxWindow`) gets a partial
  last batch as it is.
  """
  return sliding_window(
    predict,
    np.stack([case.pre, case.post], axis=-1),
    config.data.patch_size,
    len(data.get_dataset(config.data.name).regions),
    overlap=config.eval.overlap,
    batch_size=batch_size or backend.resolve("eval_batch_size", config.eval.batch_size),
    mirror_axes=mirror_axes,
    fixed_batch=getattr(predict, "fixed_batch", True),
  )
