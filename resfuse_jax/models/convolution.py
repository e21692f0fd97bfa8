"""How each kind of 3-D convolution is computed: XLA's kernels or exact rewrites of them.

XLA's CPU (and, for transposed convs, GPU) backends are pathologically slow on the
backward pass of strided convolutions and on ``lax.conv_transpose``. A `ConvPlan` says,
per kind of convolution, whether to use XLA's form or an exact rewrite
(space-to-depth + unstrided conv; 1x1x1 conv + depth-to-space; 2-D convs over depth);
every plan computes the same function from the same parameters. All tensors NDHWC.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from resfuse_jax import backend as backends
from resfuse_jax.errors import ConfigError


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


DN3 = ("NDHWC", "DHWIO", "NDHWC")


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
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), padding, dimension_numbers=DN3)
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
    lambda k: jax.lax.conv_general_dilated(x, k, (1, 1, 1), padding, dimension_numbers=DN3),
    kernel,
  )
  return input_vjp(dy)[0], kernel_vjp(dy)[0]


_conv3d_planes.defvjp(_conv3d_planes_fwd, _conv3d_planes_bwd)


def conv_transpose_k2s2(x: jax.Array, dense_kernel: jax.Array) -> jax.Array:
  """[B, D, H, W, I] x [I, 8F] (channels (pd, ph, pw, F)) -> [B, 2D, 2H, 2W, F] via XLA.

  ``conv_transpose`` without kernel transposition correlates the stride-dilated
  input, so output phase p reads kernel tap 1 - p: the taps are flipped.
  """
  i, f8 = dense_kernel.shape
  kernel = dense_kernel.reshape(i, 2, 2, 2, f8 // 8).transpose(1, 2, 3, 0, 4)[::-1, ::-1, ::-1]
  return jax.lax.conv_transpose(x, kernel, (2, 2, 2), "VALID", dimension_numbers=DN3)
