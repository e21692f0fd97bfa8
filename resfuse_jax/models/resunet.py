"""ResUNet (Zhang et al. 2018) in 3D: the backbone every model here shares."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resfuse_jax.models import layers


class ResUNetEncoder(nn.Module):
  """Residual units; level 0 keeps the resolution, every further level pools by its strides."""

  features: tuple[int, ...]
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each level in the backward pass instead of storing it
  conv_impl: str = "xla"
  strides: tuple[layers.Triple, ...] | None = None  # per level, see `layers.level_strides`

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    unit = nn.remat(layers.ResidualUnit) if self.remat else layers.ResidualUnit
    skips = []
    strides = layers.level_strides(self.strides, len(self.features))
    for level, feats in enumerate(self.features):
      x = unit(
        feats,
        strides=strides[level],
        preactivate=level > 0,
        dtype=self.dtype,
        conv_impl=self.conv_impl,
        name=f"level{level}",
      )(x)
      skips.append(x)
    return skips


class ResUNet(nn.Module):
  """Single-stream ResUNet.

  ``inputs='post'`` is the paper's Res-UNet-Single; ``inputs='pre+post'`` is
  early fusion (the two scans as two input channels).
  """

  features: tuple[int, ...]
  num_outputs: int
  inputs: str = "post"
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = "xla"
  strides: tuple[layers.Triple, ...] | None = None

  @nn.compact
  def __call__(self, pre: jax.Array, post: jax.Array) -> jax.Array:
    """pre, post: [B, D, H, W, 1] -> region logits [B, D, H, W, num_outputs] (float32)."""
    if self.inputs == "post":
      x = post
    elif self.inputs == "pre+post":
      x = jnp.concatenate([pre, post], axis=-1)
    else:
      raise ValueError(f"ResUNet.inputs must be 'post' or 'pre+post', got {self.inputs!r}")
    impl, strides = self.conv_impl, self.strides
    skips = ResUNetEncoder(
      self.features, self.dtype, self.remat, conv_impl=impl, strides=strides, name="encoder"
    )(x.astype(self.dtype))
    return layers.Decoder(
      self.features, self.num_outputs, self.dtype, conv_impl=impl, strides=strides, name="decoder"
    )(skips)
