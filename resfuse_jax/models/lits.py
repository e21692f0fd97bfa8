"""LiTS: deformable aggregation + uncertain-region inpainting (Zhang et al., IEEE TMI 2023).

Sequence-specific encoders for the main (post) and auxiliary (pre) scans. At
every level, deformable aggregation predicts per-voxel offsets from both
features, resamples the auxiliary feature there (trilinear), and fuses it with
the main feature by a per-voxel softmax over the two; the fused features are
the decoder's skips. The decoder's coarse prediction (sown into
``aux_logits``, its auxiliary loss) marks uncertain voxels, those whose
probability lies within ``UNCERTAIN_BAND`` of 0.5; a refinement block
re-predicts them from the decoder features and the confident voxels around
them, and keeps the coarse prediction elsewhere.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resfuse_jax.models import layers
from resfuse_jax.models.resunet import ResUNetEncoder

UNCERTAIN_BAND = 0.4  # |p - 0.5| < 0.4, i.e. p in (0.1, 0.9), is uncertain


def trilinear_warp(x: jax.Array, offsets: jax.Array) -> jax.Array:
  """Samples x [B, D, H, W, C] at grid + offsets [B, D, H, W, 3] (voxels), border-clamped.

  Zero offsets return x exactly (every weight but one corner's is 0).
  """
  b, d, h, w, c = x.shape
  size = jnp.array([d, h, w], jnp.float32)
  grid = jnp.stack(jnp.meshgrid(jnp.arange(d), jnp.arange(h), jnp.arange(w), indexing="ij"), -1)
  pos = jnp.clip(grid.astype(jnp.float32) + offsets.astype(jnp.float32), 0.0, size - 1.0)
  lo = jnp.floor(pos)
  frac = pos - lo
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, (size - 1).astype(jnp.int32))
  flat = x.reshape(b, d * h * w, c)
  out = jnp.zeros_like(x, dtype=jnp.float32)
  for corner in itertools.product((0, 1), repeat=3):
    idx = [jnp.where(bit, hi[..., a], lo[..., a]) for a, bit in enumerate(corner)]
    weight = jnp.prod(
      jnp.stack([frac[..., a] if bit else 1.0 - frac[..., a] for a, bit in enumerate(corner)]),
      axis=0,
    )  # [B, D, H, W]
    linear = ((idx[0] * h + idx[1]) * w + idx[2]).reshape(b, -1, 1)
    values = jnp.take_along_axis(flat, linear, axis=1).reshape(x.shape)
    out = out + weight[..., None] * values
  return out.astype(x.dtype)


class DeformableAggregation(nn.Module):
  """Aligns the auxiliary feature to the main one by learned offsets, fuses by softmax."""

  features: int
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, main: jax.Array, aux: jax.Array) -> jax.Array:
    both = jnp.concatenate([main, aux], axis=-1)
    offsets = layers.Conv3(  # zero-initialised: training starts from the identity alignment
      3,
      dtype=jnp.float32,
      kernel_init=nn.initializers.zeros,
      conv_impl=self.conv_impl,
      name="offsets",
    )(both)
    aligned = trilinear_warp(aux, offsets)
    self.sow("intermediates", "offset_field", offsets)
    weights = jax.nn.softmax(
      layers.Conv1(2, dtype=self.dtype, name="weights")(jnp.concatenate([main, aligned], -1)),
      axis=-1,
    )  # [B, D, H, W, 2]: per-voxel weights of (main, aligned aux)
    return weights[..., 0:1] * main + weights[..., 1:2] * aligned


def uncertain_mask(coarse_logits: jax.Array) -> jax.Array:
  """1.0 where the coarse probability is within ``UNCERTAIN_BAND`` of 0.5; no gradient."""
  p = jax.nn.sigmoid(jax.lax.stop_gradient(coarse_logits))
  return (jnp.abs(p - 0.5) < UNCERTAIN_BAND).astype(jnp.float32)


class UncertainRegionInpainting(nn.Module):
  """Re-predicts uncertain voxels from the decoder features and their confident neighbours."""

  features: int
  num_outputs: int
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, feats: jax.Array, coarse_logits: jax.Array) -> jax.Array:
    uncertain = uncertain_mask(coarse_logits)
    confident = jax.nn.sigmoid(coarse_logits) * (1.0 - uncertain)  # uncertain voxels masked out
    x = jnp.concatenate([feats, confident.astype(feats.dtype), uncertain.astype(feats.dtype)], -1)
    x = layers.ResidualUnit(
      self.features, dtype=self.dtype, conv_impl=self.conv_impl, name="inpaint"
    )(x)
    refined = layers.SegmentationHead(self.num_outputs, self.dtype, name="head")(x)
    return uncertain * refined + (1.0 - uncertain) * coarse_logits


class LiTS(layers.TwoSequenceModel):
  @nn.compact
  def __call__(self, pre: jax.Array, post: jax.Array) -> jax.Array:
    impl, strides = self.conv_impl, self.strides
    encoder = functools.partial(
      ResUNetEncoder, self.features, self.dtype, self.remat, conv_impl=impl, strides=strides
    )
    main = encoder(name="post_encoder")(post.astype(self.dtype))
    aux = encoder(name="pre_encoder")(pre.astype(self.dtype))
    skips = [
      DeformableAggregation(f, self.dtype, conv_impl=impl, name=f"aggregate{level}")(m, a)
      for level, (f, m, a) in enumerate(zip(self.features, main, aux))
    ]
    feats = layers.Decoder(
      self.features, None, self.dtype, conv_impl=impl, strides=strides, name="decoder"
    )(skips)
    coarse = layers.SegmentationHead(self.num_outputs, self.dtype, name="coarse_head")(feats)
    self.sow("aux_logits", "coarse", coarse)
    return UncertainRegionInpainting(
      self.features[0], self.num_outputs, self.dtype, conv_impl=impl, name="inpainting"
    )(feats, coarse)
