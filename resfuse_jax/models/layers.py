"""3D building blocks shared by every model, written around XLA's fast paths.

XLA's CPU (and, for transposed convs, GPU) backends are pathologically slow on
two patterns a U-Net needs: the backward pass of strided convolutions and
``lax.conv_transpose``. Every block here expresses those through exact
rewrites instead (space-to-depth + unstrided conv; 1x1x1 conv + depth-to-space),
keeping the parameter shapes of the textbook layers. All tensors are NDHWC.

Every module with convolutions has a ``conv_impl`` field: a `ConvPlan` (or
just the 3x3x3 impl's name, "xla" or "planes", see `conv3d`) that also says
how stride-2 convs and transposed convs are computed. `resolve_conv_plan`
fills it for a backend (``resfuse_jax.backend``), outside traced code, so the
choice is part of the model (and of jit's cache key). Every plan has the same
parameters, so a checkpoint serves all of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resfuse_jax import config_lib
from resfuse_jax.models.convolution import (
  DN3,
  ConvPlan,
  Triple,
  as_plan,
  as_triple,
  conv3d,
  conv_transpose_k2s2,
  depth_to_space,
  space_to_depth,
  stride2_kernel_as_s2d,
  strided_padding,
)

Dtype = Any

conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

# The collection in which a fusion model sows, per encoder level it fuses, the
# auxiliary contribution added to the main branch, [B, d, h, w, C]. Consumers take
# ``jax.tree.leaves(collection)`` (one array per fused level), not module paths.
FUSION_TERMS = "fusion_terms"


Strides = int | Triple  # 1, 2, or per array axis (D, H, W) each 1 or 2
level_strides = config_lib.level_strides  # model.strides -> one triple per encoder level


class Conv3(nn.Module):
  """3x3x3 convolution, SAME padding, per-axis stride 1 or 2 (space-to-depth or XLA's)."""

  features: int
  strides: Strides = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = conv_init
  conv_impl: str | ConvPlan = "xla"  # see `ConvPlan`

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    plan = as_plan(self.conv_impl)
    kernel = self.param("kernel", self.kernel_init, (3, 3, 3, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides = as_triple(self.strides)
    pad = strided_padding(strides)
    if strides == (1, 1, 1):
      y = conv3d(x, kernel, pad, plan.conv)
    elif plan.downsample == "strided":
      # SAME for k3 s2 on even sizes pads (0, 1), as the space-to-depth form reads.
      y = jax.lax.conv_general_dilated(x, kernel, strides, pad, dimension_numbers=DN3)
    else:  # the same padding over the space-to-depth blocks
      y = conv3d(space_to_depth(x, strides), stride2_kernel_as_s2d(kernel, strides), pad, plan.conv)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class Conv1(nn.Module):
  """1x1x1 convolution; a stride is an exact subsample followed by the 1x1x1 conv."""

  features: int
  strides: Strides = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    sd, sh, sw = as_triple(self.strides)
    if (sd, sh, sw) != (1, 1, 1):
      x = x[:, ::sd, ::sh, ::sw]
    return nn.Dense(
      self.features, use_bias=self.use_bias, kernel_init=conv_init, dtype=self.dtype, name="dense"
    )(x)


class _Kernel(nn.Module):
  """A bare ``kernel`` parameter at the path ``nn.Dense`` would give it."""

  shape: tuple[int, ...]

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("kernel", conv_init, self.shape)


class UpConv(nn.Module):
  """Transposed conv, kernel = stride = ``factors``, as a 1x1x1 conv + depth-to-space.

  One bias per output channel, added after depth-to-space: exactly the
  parameters (and function) of ``ConvTranspose3d(kernel=f, stride=f)``, which
  ``upsample="transpose"`` runs instead (XLA's ``conv_transpose``), same parameters.
  """

  features: int
  dtype: Dtype = jnp.float32
  conv_impl: str | ConvPlan = "xla"  # see `ConvPlan`
  factors: Triple = (2, 2, 2)  # per array axis (D, H, W), each 1 or 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    factors = as_triple(self.factors)
    width = math.prod(factors) * self.features
    if as_plan(self.conv_impl).upsample == "transpose":
      kernel = _Kernel((x.shape[-1], width), name="dense")()
      y = conv_transpose_k2s2(x.astype(self.dtype), kernel.astype(self.dtype), factors)
    else:
      y = nn.Dense(width, use_bias=False, kernel_init=conv_init, dtype=self.dtype, name="dense")(x)
      y = depth_to_space(y, factors)
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return y + bias.astype(self.dtype)  # [B, fd*D, fh*H, fw*W, features]


def instance_norm(name: str, dtype: Dtype) -> nn.Module:
  """Per-sample, per-channel norm: lets both branches share one batched call."""
  return nn.InstanceNorm(dtype=dtype, name=name)


class ResidualBranch(nn.Module):
  """F(x) of a residual unit: [norm -> ReLU ->] conv3 (stride s) -> norm -> ReLU -> conv3.

  ``preactivate=False`` drops the leading norm/ReLU for the stem, as in
  Zhang et al.'s ResUNet, so the raw intensities (and with them the
  enhancement) reach the first convolution unnormalised.
  """

  features: int
  strides: Strides = 1
  preactivate: bool = True
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.preactivate:
      x = nn.relu(instance_norm("norm_in", self.dtype)(x))
    conv = functools.partial(Conv3, self.features, dtype=self.dtype, conv_impl=self.conv_impl)
    x = conv(self.strides, name="conv_a")(x)
    x = nn.relu(instance_norm("norm_mid", self.dtype)(x))
    return conv(1, name="conv_b")(x)


class Projection(nn.Module):
  """P(x) of a residual unit: identity, or conv1 (stride s) + norm when the shape changes."""

  features: int
  strides: Strides = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if as_triple(self.strides) == (1, 1, 1) and x.shape[-1] == self.features:
      return x
    x = Conv1(self.features, self.strides, use_bias=False, dtype=self.dtype, name="conv")(x)
    return instance_norm("norm", self.dtype)(x)


class ResidualUnit(nn.Module):
  """y = F(x) + P(x), the ResUNet block."""

  features: int
  strides: Strides = 1
  preactivate: bool = True
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f, p = residual_unit_parts(
      self.features, self.strides, self.preactivate, self.dtype, self.conv_impl
    )
    return f(x) + p(x)


def residual_unit_parts(
  features: int, strides: Strides, preactivate: bool, dtype: Dtype, conv_impl: str
) -> tuple[nn.Module, nn.Module]:
  """(F, P) of a residual unit, named ``residual`` and ``projection``.

  Call inside a compact method: the modules belong to the caller, so a model that
  applies F and P itself (ResFuse's shared encoder level) has ResidualUnit's parameters.
  """
  f = ResidualBranch(features, strides, preactivate, dtype, conv_impl=conv_impl, name="residual")
  return f, Projection(features, strides, dtype, name="projection")


def segmentation_head(x: jax.Array, num_outputs: int, dtype: Dtype) -> jax.Array:
  """norm -> ReLU -> conv1 to float32 logits; call inside a compact method (names its modules)."""
  x = nn.relu(instance_norm("norm_out", dtype)(x))
  return Conv1(num_outputs, dtype=jnp.float32, name="head")(x).astype(jnp.float32)


class SegmentationHead(nn.Module):
  """`segmentation_head` as a module, for models with several heads."""

  num_outputs: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return segmentation_head(x, self.num_outputs, self.dtype)


class Decoder(nn.Module):
  """ResUNet decoder: per level, upsample, concatenate the skip, residual unit; conv1 head.

  ``num_outputs=None`` returns the last level's features [B, D, H, W, features[0]]
  instead of logits, for models that fuse or refine before their own heads.
  ``strides``: the encoder's (``level_strides``); level l upsamples by level l+1's.
  """

  features: tuple[int, ...]
  num_outputs: int | None
  dtype: Dtype = jnp.float32
  return_levels: bool = False
  conv_impl: str = "xla"
  strides: tuple[Triple, ...] | None = None

  @nn.compact
  def __call__(self, skips: list[jax.Array]) -> jax.Array | list[jax.Array]:
    """``return_levels``: every level's output, full resolution first, bottleneck last."""
    x = skips[-1]
    levels = [x]
    strides = level_strides(self.strides, len(skips))
    for level in range(len(skips) - 2, -1, -1):
      x = UpConv(
        self.features[level], self.dtype, self.conv_impl, strides[level + 1], name=f"up{level}"
      )(x)
      x = jnp.concatenate([x, skips[level]], axis=-1)
      x = ResidualUnit(
        self.features[level], 1, True, self.dtype, conv_impl=self.conv_impl, name=f"level{level}"
      )(x)
      levels.insert(0, x)
    if self.return_levels:
      return levels
    if self.num_outputs is None:
      return x
    return segmentation_head(x, self.num_outputs, self.dtype)


class TwoSequenceModel(nn.Module):
  """The fields every fusion baseline shares; subclasses define ``__call__(pre, post)``:
  [B, D, H, W, 1] twice -> region logits [B, D, H, W, num_outputs] (float32)."""

  features: tuple[int, ...]
  num_outputs: int
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute encoder levels in the backward pass
  conv_impl: str = "xla"
  strides: tuple[Triple, ...] | None = None  # per encoder level, see `level_strides`
