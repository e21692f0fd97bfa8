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
import math
from typing import Any

import jax
import jax.numpy as jnp

from resfuse_jax import backend as backends
from resfuse_jax.errors import ConfigError

Triple = tuple[int, int, int]
ISOTROPIC: Triple = (2, 2, 2)


def as_triple(strides: int | tuple[int, ...]) -> Triple:
  """1 -> (1, 1, 1); a per-axis (D, H, W) triple of 1s and 2s is checked and returned."""
  triple = (int(strides),) * 3 if isinstance(strides, int) else tuple(int(s) for s in strides)
  if len(triple) != 3 or any(s not in (1, 2) for s in triple):
    raise ValueError(f"strides must be 1, 2 or a triple of them per axis; got {strides!r}")
  return triple


def space_to_depth(x: jax.Array, factors: Triple = ISOTROPIC) -> jax.Array:
  """[B, D, H, W, C] -> [B, D/fd, H/fh, W/fw, fd*fh*fw*C], channels ordered (pd, ph, pw, C)."""
  b, d, h, w, c = x.shape
  fd, fh, fw = factors
  x = x.reshape(b, d // fd, fd, h // fh, fh, w // fw, fw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, d // fd, h // fh, w // fw, fd * fh * fw * c)


def depth_to_space(x: jax.Array, factors: Triple = ISOTROPIC) -> jax.Array:
  """[B, D, H, W, fd*fh*fw*C] -> [B, fd*D, fh*H, fw*W, C]; inverse of `space_to_depth`."""
  b, d, h, w, cf = x.shape
  fd, fh, fw = factors
  c = cf // (fd * fh * fw)
  x = x.reshape(b, d, h, w, fd, fh, fw, c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, fd * d, fh * h, fw * w, c)


def strided_padding(strides: Triple) -> tuple[tuple[int, int], ...]:
  """SAME padding of a k3 conv per axis: (1, 1) unstrided, (0, 1) at stride 2 on even sizes."""
  return tuple((0, 1) if s == 2 else (1, 1) for s in strides)


def stride2_kernel_as_s2d(kernel: jax.Array, strides: Triple = ISOTROPIC) -> jax.Array:
  """Rearranges a [3,3,3,I,O] strided kernel into the unstrided one over `space_to_depth`.

  With SAME padding a stride-2 k3 conv reads input taps 2i, 2i+1, 2i+2 on that
  axis: tap k sits in space-to-depth block i + k // 2 at phase k % 2. Padding
  the axis to 4 taps and splitting 4 -> (block offset, phase) is that map; an
  unstrided axis keeps its 3 taps with a single phase. Shape [t_d, t_h, t_w,
  fd*fh*fw*I, O] with t = 2 on a stride-2 axis, 3 on an unstrided one.
  """
  i, o = kernel.shape[-2:]
  k = jnp.pad(kernel, tuple((0, 1) if s == 2 else (0, 0) for s in strides) + ((0, 0),) * 2)
  split = [n for s in strides for n in ((2, 2) if s == 2 else (3, 1))]
  k = k.reshape(*split, i, o)  # (od, pd, oh, ph, ow, pw, I, O)
  k = k.transpose(0, 2, 4, 1, 3, 5, 6, 7)  # (od, oh, ow, pd, ph, pw, I, O)
  taps = tuple(2 if s == 2 else 3 for s in strides)
  return k.reshape(*taps, math.prod(strides) * i, o)


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


def conv_transpose_k2s2(
  x: jax.Array, dense_kernel: jax.Array, factors: Triple = ISOTROPIC
) -> jax.Array:
  """[B, D, H, W, I] x [I, fd*fh*fw*F] (channels (pd, ph, pw, F)) -> [B, fd*D, fh*H, fw*W, F].

  XLA's transposed conv (kernel = stride = ``factors``). ``conv_transpose``
  without kernel transposition correlates the stride-dilated input, so output
  phase p reads kernel tap f - 1 - p: the taps are flipped.
  """
  i, cf = dense_kernel.shape
  kernel = dense_kernel.reshape(i, *factors, cf // math.prod(factors)).transpose(1, 2, 3, 0, 4)
  kernel = kernel[::-1, ::-1, ::-1]
  return jax.lax.conv_transpose(x, kernel, tuple(factors), "VALID", dimension_numbers=DN3)
