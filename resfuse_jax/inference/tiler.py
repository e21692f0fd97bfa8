"""Sliding-window inference over whole volumes (nnU-Net's Gaussian-weighted tiling).

ONE tiler for predict, evaluate, the fusion heat map and the benchmarks. Where the
windows are cut and blended is one setting (``placement``, resolved by backend.py):
``host`` cuts tiles with numpy around any window function (a JAX one, onnxruntime's,
the heat map's); ``device`` runs cutting, prediction and Gaussian accumulation as one
jitted program (a `JaxWindow` only), so on an accelerator only the volume goes in and
the blended output comes out (10x faster than host tiling on an H200, BUILD_NOTES).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resfuse_jax import backend, data
from resfuse_jax.errors import ConfigError

PLACEMENTS = backend.CHOICES["tiling"]
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


class JaxWindow:
  """A traceable ``forward(params, tiles)`` with its parameters: the window function both
  placements can run. Called on numpy tiles (host tiling) it returns numpy; the device
  tiler traces ``forward`` into its own program. Pass a jitted ``forward`` (compiled
  once for host calls; a nested jit is inlined in the device program)."""

  fixed_batch = True  # a jitted function compiles once per batch shape: fill the last batch

  def __init__(self, forward: Callable, params: Any):
    self.forward, self.params = forward, params

  def __call__(self, tiles: np.ndarray) -> np.ndarray:
    return np.asarray(self.forward(self.params, tiles))


def sliding_window(
  predict: Callable[[np.ndarray], np.ndarray],
  volume: np.ndarray,
  window: Sequence[int],
  overlap: float = 0.5,
  batch_size: int = 4,
  mirror_axes: Sequence[int] = (),
  placement: str = "auto",
  fixed_batch: bool | None = None,
) -> np.ndarray:
  """Predicts a whole volume tile by tile and blends the tiles with Gaussian weights.

  Args:
    predict: [n, *window, C] -> [n, *window, K]: probabilities, or any per-voxel output
      (the fusion heat map's magnitudes); what it returns is what is accumulated.
    volume: [D, H, W, C]; padded with zeros up to the window where smaller.
    mirror_axes: spatial axes (0-2) for mirroring test-time augmentation: every
      combination of flips is predicted, flipped back and averaged (2^k passes).
    placement: ``host``, ``device`` (``predict`` must be a `JaxWindow`) or ``auto``
      (backend.py's column; a window function that is not a `JaxWindow` runs on the host).
    fixed_batch: call ``predict`` with exactly ``batch_size`` tiles, zero tiles filling
      the last batch (a jitted function compiles once); False sends the last batch as
      it is (onnxruntime's dynamic batch computes no filler). None: ``predict.fixed_batch``
      where it has one, else True.

  Returns:
    [D, H, W, K] float32 Gaussian-weighted averages.
  """
  window, mirror_axes = tuple(int(w) for w in window), tuple(mirror_axes)
  if any(a not in (0, 1, 2) for a in mirror_axes):
    raise ValueError(f"mirror_axes must be spatial axes 0, 1, 2; got {mirror_axes}")
  if resolve_placement(placement, predict) == "device":
    run = _device_program(predict.forward, volume.shape, window, overlap, batch_size, mirror_axes)
    return np.asarray(run(predict.params, volume))
  if fixed_batch is None:
    fixed_batch = getattr(predict, "fixed_batch", True)
  return _host_tiling(predict, volume, window, overlap, batch_size, mirror_axes, fixed_batch)


def resolve_placement(placement: str, predict: Callable) -> str:
  """``auto`` is backend.py's column, on the host for a window function the device tiler
  cannot trace; ``device`` asked for explicitly needs a `JaxWindow`."""
  if placement != "auto" and placement not in PLACEMENTS:
    raise ConfigError(f"placement must be one of auto, {', '.join(PLACEMENTS)}; got {placement!r}")
  traceable = isinstance(predict, JaxWindow)
  if placement == "auto":
    return backend.resolve("tiling", "auto") if traceable else "host"
  if placement == "device" and not traceable:
    raise ConfigError(
      f"the device tiler traces a JAX window function (tiler.JaxWindow); got {predict!r}"
    )
  return placement


def _host_tiling(predict, volume, window, overlap, batch_size, mirror_axes, fixed_batch):
  """numpy tiles in, the window function's outputs blended in numpy arrays."""
  shape = volume.shape[:3]
  padded = tuple(max(s, w) for s, w in zip(shape, window))
  pad = [(0, p - s) for p, s in zip(padded, shape)] + [(0, 0)]
  vol = np.pad(volume, pad) if any(hi for _, hi in pad) else volume
  weights = gaussian_importance(window)[..., None]
  acc, norm = None, np.zeros((*padded, 1), np.float32)
  starts = window_starts(padded, window, overlap)
  for i in range(0, len(starts), batch_size):
    chunk = starts[i : i + batch_size]
    tiles = np.zeros(
      (batch_size if fixed_batch else len(chunk), *window, vol.shape[-1]), np.float32
    )
    for j, s in enumerate(chunk):
      tiles[j] = vol[tuple(slice(a, a + w) for a, w in zip(s, window))]
    outputs = _mirrored(
      lambda t: np.asarray(predict(np.ascontiguousarray(t))), np, tiles, mirror_axes
    )
    if acc is None:  # [*padded, K]: K is what the window function returns
      acc = np.zeros((*padded, outputs.shape[-1]), np.float32)
    for j, s in enumerate(chunk):
      sl = tuple(slice(a, a + w) for a, w in zip(s, window))
      acc[sl] += outputs[j] * weights
      norm[sl] += weights
  return (acc / norm)[: shape[0], : shape[1], : shape[2]]


def _mirrored(predict: Callable, xp, tiles, axes: tuple[int, ...]):
  """Mean of ``predict`` over every subset of flipped spatial ``axes`` (numpy or jax.numpy)."""
  subsets = [s for k in range(len(axes) + 1) for s in itertools.combinations(axes, k)]
  total = None
  for subset in subsets:
    flip = tuple(a + 1 for a in subset)  # skip the batch axis
    y = predict(xp.flip(tiles, flip) if flip else tiles)
    y = (xp.flip(y, flip) if flip else y).astype(xp.float32)
    total = y if total is None else total + y
  return total / len(subsets)


@functools.lru_cache(maxsize=8)
def _device_program(forward, shape, window, overlap, batch_size, mirror_axes) -> Callable:
  """(params, [D, H, W, C]) -> [D, H, W, K], one jitted program per volume shape.

  A scan over batches of window corners: tiles are sliced, predicted (mirrored) and
  Gaussian-accumulated on the device; padded corners of the last batch weigh zero.
  """
  spatial = tuple(int(s) for s in shape[:3])
  padded = tuple(max(s, w) for s, w in zip(spatial, window))
  starts = window_starts(padded, window, overlap)
  n_batches = -(-len(starts) // batch_size)
  extra = n_batches * batch_size - len(starts)
  corners = np.array(starts + [starts[-1]] * extra, np.int32).reshape(n_batches, batch_size, 3)
  valid = np.array([1.0] * len(starts) + [0.0] * extra, np.float32).reshape(n_batches, batch_size)
  weights = gaussian_importance(window)[..., None]

  def add(array, corner, values):
    index, size = (*corner, 0), (*window, array.shape[-1])
    return jax.lax.dynamic_update_slice(
      array, jax.lax.dynamic_slice(array, index, size) + values, index
    )

  def run(params, volume):
    vol = jnp.pad(
      volume.astype(jnp.float32), [(0, p - s) for p, s in zip(padded, spatial)] + [(0, 0)]
    )
    cut = (*window, vol.shape[-1])

    def body(carry, xs):
      acc, norm = carry
      batch_corners, batch_valid = xs
      tiles = jax.vmap(lambda c: jax.lax.dynamic_slice(vol, (*c, 0), cut))(batch_corners)
      outputs = _mirrored(lambda t: forward(params, t), jnp, tiles, mirror_axes)
      for j in range(batch_size):
        w = weights * batch_valid[j]
        acc = add(acc, batch_corners[j], outputs[j] * w)
        norm = add(norm, batch_corners[j], w)
      return (acc, norm), None

    tile = jax.ShapeDtypeStruct((batch_size, *cut), jnp.float32)
    k = jax.eval_shape(forward, params, tile).shape[-1]
    init = (jnp.zeros((*padded, k), jnp.float32), jnp.zeros((*padded, 1), jnp.float32))
    (acc, norm), _ = jax.lax.scan(body, init, (corners, valid))
    return (acc / norm)[: spatial[0], : spatial[1], : spatial[2]]

  return jax.jit(run)


def predict_volume(
  predict: Callable[[np.ndarray], np.ndarray],
  case: data.Case,
  config,
  batch_size: int | None = None,
  mirror_axes: Sequence[int] = (),
  placement: str = "auto",
) -> np.ndarray:
  """A case's [D, H, W, R] region probabilities with the config's window and overlap.

  ``batch_size`` defaults to ``eval.batch_size`` (training rounds it up to the mesh).
  """
  return sliding_window(
    predict,
    np.stack([case.pre, case.post], axis=-1),
    config.data.patch_size,
    overlap=config.eval.overlap,
    batch_size=batch_size or backend.resolve("eval_batch_size", config.eval.batch_size),
    mirror_axes=mirror_axes,
    placement=placement,
  )
