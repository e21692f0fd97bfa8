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

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resfuse_jax import backend as backends
from resfuse_jax.errors import ConfigError

Dtype = Any

conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

# The collection in which a fusion model sows, per encoder level it fuses, the
# auxiliary contribution added to the main branch, [B, d, h, w, C]. Consumers take
# ``jax.tree.leaves(collection)`` (one array per fused level), not module paths.
FUSION_TERMS = "fusion_terms"


def space_to_depth(x: jax.Array) -> jax.Array:
  """[B, D, H, W, C] -> [B, D/2, H/2, W/2, 8C], channels ordered (pd, ph, pw, C)."""
  b, d, h, w, c = x.shape
  x = x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, d // 2, h // 2, w // 2, 8 * c)


def depth_to_space(x: jax.Array) -> jax.Array:
  """[B, D, H, W, 8C] -> [B, 2D, 2H, 2W, C]; inverse of `space_to_depth`."""
  b, d, h, w, c8 = x.shape
  c = c8 // 8
  x = x.reshape(b, d, h, w, 2, 2, 2, c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, 2 * d, 2 * h, 2 * w, c)


def stride2_kernel_as_s2d(kernel: jax.Array) -> jax.Array:
  """Rearranges a [3,3,3,I,O] stride-2 kernel into a [2,2,2,8I,O] unstrided one.

  With SAME padding a stride-2 k3 conv reads input taps 2i, 2i+1, 2i+2 per
  axis: tap k sits in space-to-depth block i + k // 2 at phase k % 2. Padding
  the kernel to 4 taps and splitting 4 -> (block offset, phase) is that map.
  """
  i, o = kernel.shape[-2:]
  k = jnp.pad(kernel, ((0, 1), (0, 1), (0, 1), (0, 0), (0, 0)))
  k = k.reshape(2, 2, 2, 2, 2, 2, i, o)  # (od, pd, oh, ph, ow, pw, I, O)
  k = k.transpose(0, 2, 4, 1, 3, 5, 6, 7)  # (od, oh, ow, pd, ph, pw, I, O)
  return k.reshape(2, 2, 2, 8 * i, o)


CONV_IMPLS = ("auto", "xla", "planes")


@dataclasses.dataclass(frozen=True)
class ConvPlan:
  """How each kind of convolution is computed (every choice is exact; speed differs)."""

  conv: str = "xla"  # 3x3x3: "xla" (XLA's 3D conv) | "planes" (2D convs over depth)
  downsample: str = "space_to_depth"  # stride 2: "space_to_depth" | "strided" (XLA's)
  upsample: str = "depth_to_space"  # k2 s2 transposed: "depth_to_space" | "transpose"


def as_plan(conv_impl: str | ConvPlan) -> ConvPlan:
  return conv_impl if isinstance(conv_impl, ConvPlan) else ConvPlan(conv=conv_impl)


def resolve_conv_impl(name: str, backend: str | None = None) -> str:
  """``model.conv_impl`` (auto | xla | planes) -> the `conv3d` impl for ``backend``.

  ``auto`` is ``planes`` on CPU and ``xla`` elsewhere: XLA's CPU backend runs 2D
  convolutions 2-4x faster than 3D ones (forward and input gradient), while
  cuDNN's 3D kernels are the fast path on GPU. ``backend`` defaults to
  ``jax.default_backend()``; call this outside traced code.
  """
  if name not in CONV_IMPLS:
    raise ConfigError(f"model.conv_impl must be one of {', '.join(CONV_IMPLS)}; got {name!r}")
  return backends.resolve("conv_impl", name, backend, "model.conv_impl")


def resolve_conv_plan(model_config: Any, backend: str | None = None) -> ConvPlan:
  """``model.conv_impl``, ``model.downsample`` and ``model.upsample`` for ``backend``."""
  return ConvPlan(
    conv=resolve_conv_impl(model_config.conv_impl, backend),
    downsample=backends.resolve("downsample", model_config.downsample, backend, "model.downsample"),
    upsample=backends.resolve("upsample", model_config.upsample, backend, "model.upsample"),
  )


_DN3 = ("NDHWC", "DHWIO", "NDHWC")


def conv3d(x: jax.Array, kernel: jax.Array, padding, impl: str) -> jax.Array:
  """Unstrided 3D convolution, NDHWC x DHWIO, explicit ``((lo, hi),) * 3`` padding.

  ``impl`` (resolved, see `resolve_conv_impl`): ``xla`` is XLA's 3D conv;
  ``planes`` is the exact rewrite y = sum_kd conv2d(x[kd : kd + D_out], kernel[kd])
  with depth folded into the batch, for the forward pass and the input gradient;
  the weight gradient stays XLA's 3D one, which is the faster of the two on CPU
  (benchmarks/conv_kernels.py).
  """
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  if impl == "xla":
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), padding, dimension_numbers=_DN3)
  if impl == "planes":
    return _conv3d_planes(x, kernel, padding)
  raise ValueError(f"conv3d impl must be 'xla' or 'planes' (see resolve_conv_impl); got {impl!r}")


def _planes_forward(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  x = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
  b, d, h, w, c = x.shape
  taps = kernel.shape[0]
  d_out = d - taps + 1
  y = None
  for k in range(taps):
    plane = jax.lax.conv_general_dilated(
      x[:, k : k + d_out].reshape(b * d_out, h, w, c),
      kernel[k],
      (1, 1),
      padding[1:],
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = plane if y is None else y + plane
  return y.reshape(b, d_out, *y.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3d_planes(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  return _planes_forward(x, kernel, padding)


def _conv3d_planes_fwd(x, kernel, padding):
  # Residuals are x and the kernel only, not the kd shifted copies of x.
  return _planes_forward(x, kernel, padding), (x, kernel)


def _conv3d_planes_bwd(padding, residuals, dy):
  x, kernel = residuals
  # Under jit the primal outputs of these vjps are unused and removed by XLA.
  _, input_vjp = jax.vjp(lambda x: _planes_forward(x, kernel, padding), x)
  _, kernel_vjp = jax.vjp(
    lambda k: jax.lax.conv_general_dilated(x, k, (1, 1, 1), padding, dimension_numbers=_DN3),
    kernel,
  )
  return input_vjp(dy)[0], kernel_vjp(dy)[0]


_conv3d_planes.defvjp(_conv3d_planes_fwd, _conv3d_planes_bwd)


class Conv3(nn.Module):
  """3x3x3 convolution, SAME padding, stride 1 or 2 (space-to-depth or XLA's strided conv)."""

  features: int
  strides: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = conv_init
  conv_impl: str | ConvPlan = "xla"  # see `ConvPlan`

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    plan = as_plan(self.conv_impl)
    kernel = self.param("kernel", self.kernel_init, (3, 3, 3, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.strides == 1:
      y = conv3d(x, kernel, ((1, 1),) * 3, plan.conv)
    elif self.strides == 2 and plan.downsample == "strided":
      # SAME for k3 s2 on even sizes pads (0, 1), as the space-to-depth form reads.
      y = jax.lax.conv_general_dilated(x, kernel, (2, 2, 2), ((0, 1),) * 3, dimension_numbers=_DN3)
    elif self.strides == 2:
      y = conv3d(space_to_depth(x), stride2_kernel_as_s2d(kernel), ((0, 1),) * 3, plan.conv)
    else:
      raise ValueError(f"Conv3 supports strides 1 or 2, got {self.strides}")
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class Conv1(nn.Module):
  """1x1x1 convolution; stride 2 is an exact subsample followed by the 1x1x1 conv."""

  features: int
  strides: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.strides not in (1, 2):
      raise ValueError(f"Conv1 supports strides 1 or 2, got {self.strides}")
    if self.strides == 2:
      x = x[:, ::2, ::2, ::2]
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
  """Transposed conv k2 s2, written as a 1x1x1 conv to 8*features + depth-to-space.

  One bias per output channel, added after depth-to-space: exactly the
  parameters (and function) of ``ConvTranspose3d(kernel=2, stride=2)``, which
  ``upsample="transpose"`` runs instead (XLA's ``conv_transpose``), same parameters.
  """

  features: int
  dtype: Dtype = jnp.float32
  conv_impl: str | ConvPlan = "xla"  # see `ConvPlan`

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if as_plan(self.conv_impl).upsample == "transpose":
      kernel = _Kernel((x.shape[-1], 8 * self.features), name="dense")()
      y = conv_transpose_k2s2(x.astype(self.dtype), kernel.astype(self.dtype))
    else:
      y = nn.Dense(
        8 * self.features, use_bias=False, kernel_init=conv_init, dtype=self.dtype, name="dense"
      )(x)
      y = depth_to_space(y)
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return y + bias.astype(self.dtype)  # [B, 2D, 2H, 2W, features]


def conv_transpose_k2s2(x: jax.Array, dense_kernel: jax.Array) -> jax.Array:
  """[B, D, H, W, I] x [I, 8F] (channels (pd, ph, pw, F)) -> [B, 2D, 2H, 2W, F] via XLA.

  ``conv_transpose`` without kernel transposition correlates the stride-dilated
  input, so output phase p reads kernel tap 1 - p: the taps are flipped.
  """
  i, f8 = dense_kernel.shape
  kernel = dense_kernel.reshape(i, 2, 2, 2, f8 // 8).transpose(1, 2, 3, 0, 4)[::-1, ::-1, ::-1]
  return jax.lax.conv_transpose(x, kernel, (2, 2, 2), "VALID", dimension_numbers=_DN3)


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
  strides: int = 1
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
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.strides == 1 and x.shape[-1] == self.features:
      return x
    x = Conv1(self.features, self.strides, use_bias=False, dtype=self.dtype, name="conv")(x)
    return instance_norm("norm", self.dtype)(x)


class ResidualUnit(nn.Module):
  """y = F(x) + P(x), the ResUNet block."""

  features: int
  strides: int = 1
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
  features: int, strides: int, preactivate: bool, dtype: Dtype, conv_impl: str
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
  """

  features: tuple[int, ...]
  num_outputs: int | None
  dtype: Dtype = jnp.float32
  return_levels: bool = False
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, skips: list[jax.Array]) -> jax.Array | list[jax.Array]:
    """``return_levels``: every level's output, full resolution first, bottleneck last."""
    x = skips[-1]
    levels = [x]
    for level in range(len(skips) - 2, -1, -1):
      x = UpConv(self.features[level], self.dtype, self.conv_impl, name=f"up{level}")(x)
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
