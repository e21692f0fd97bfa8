"""ResFuse: the paper's residual fusion of pre- and post-contrast encoders.

For every encoder level l, with ONE set of weights F_l, P_l shared by both
branches (paper Sec. 2.1, Fig. 2):

  auxiliary (pre):  a_{l+1} = F_l(a_l) + P_l(a_l)
  main (post):      m_{l+1} = F_l(m_l) + W_l(a_l)

The main branch's identity skip is replaced by the auxiliary feature seen
through W_l, so F_l learns the enhancement residual at every scale. The
decoder sees the main branch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resfuse_jax.errors import ConfigError
from resfuse_jax.models import layers

FUSIONS = ("identity", "conv", "gate")


class FusionWeight(nn.Module):
  """W_l, the fusion weight learning block (Fig. 2c) and its ablations.

  - ``identity``: W_l = P_l, the plain residual swap of Fig. 2b (no parameters);
  - ``conv``: a learned 1x1x1 conv on a_l (stride of the level);
  - ``gate``: sigmoid(conv1([m_l, a_l])) * P_l(a_l), a per-voxel gate.
  """

  features: int
  strides: layers.Strides
  fusion: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, main: jax.Array, aux: jax.Array, projected_aux: jax.Array) -> jax.Array:
    if self.fusion == "identity":
      return projected_aux
    if self.fusion == "conv":
      return layers.Conv1(self.features, self.strides, dtype=self.dtype, name="conv")(aux)
    if self.fusion == "gate":
      both = jnp.concatenate([main, aux], axis=-1)
      gate = layers.Conv1(self.features, self.strides, dtype=self.dtype, name="gate")(both)
      return nn.sigmoid(gate) * projected_aux
    raise ConfigError(f"model.fusion must be one of {FUSIONS}, got {self.fusion!r}")


class ResFuseLevel(nn.Module):
  """One encoder level applied to both branches, F_l in a single batched call."""

  features: int
  strides: layers.Strides
  preactivate: bool
  fusion: str
  fuse: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, main: jax.Array, aux: jax.Array) -> tuple[jax.Array, jax.Array]:
    residual, projection = layers.residual_unit_parts(
      self.features, self.strides, self.preactivate, self.dtype, self.conv_impl
    )
    n = main.shape[0]
    f = residual(jnp.concatenate([main, aux], axis=0))  # [2B, ...]: both branches, one call
    f_main, f_aux = f[:n], f[n:]
    if not self.fuse:  # ablation: this level keeps its ordinary skips
      return f_main + projection(main), f_aux + projection(aux)
    p_aux = projection(aux)
    w_aux = FusionWeight(self.features, self.strides, self.fusion, self.dtype, name="fusion")(
      main, aux, p_aux
    )
    self.sow(layers.FUSION_TERMS, "term", w_aux)  # for the Fig. 4-style heat map
    return f_main + w_aux, f_aux + p_aux


class ResFuseEncoder(nn.Module):
  """Shared-weight encoder over (main, aux); returns the main branch per level."""

  features: tuple[int, ...]
  fusion: str = "conv"
  fuse_levels: Sequence[int] | None = None
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each level in the backward pass instead of storing it
  conv_impl: str = "xla"
  strides: tuple[layers.Triple, ...] | None = None  # per level, see `layers.level_strides`

  @nn.compact
  def __call__(self, main: jax.Array, aux: jax.Array) -> list[jax.Array]:
    level_cls = nn.remat(ResFuseLevel) if self.remat else ResFuseLevel
    skips = []
    strides = layers.level_strides(self.strides, len(self.features))
    for level, feats in enumerate(self.features):
      fuse = self.fuse_levels is None or level in self.fuse_levels
      main, aux = level_cls(
        feats,
        strides=strides[level],
        preactivate=level > 0,
        fusion=self.fusion,
        fuse=fuse,
        dtype=self.dtype,
        conv_impl=self.conv_impl,
        name=f"level{level}",
      )(main, aux)
      skips.append(main)
    return skips


class ResFuse(nn.Module):
  """The paper's network: post-contrast main branch, pre-contrast auxiliary branch."""

  features: tuple[int, ...]
  num_outputs: int
  fusion: str = "conv"
  fuse_levels: Sequence[int] | None = None
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = "xla"
  strides: tuple[layers.Triple, ...] | None = None

  @nn.compact
  def __call__(self, pre: jax.Array, post: jax.Array) -> jax.Array:
    """pre, post: [B, D, H, W, 1] -> region logits [B, D, H, W, num_outputs] (float32)."""
    if self.fusion not in FUSIONS:
      raise ConfigError(f"model.fusion must be one of {FUSIONS}, got {self.fusion!r}")
    skips = ResFuseEncoder(
      self.features,
      self.fusion,
      self.fuse_levels,
      self.dtype,
      self.remat,
      conv_impl=self.conv_impl,
      strides=self.strides,
      name="encoder",
    )(post.astype(self.dtype), pre.astype(self.dtype))
    return layers.Decoder(
      self.features,
      self.num_outputs,
      self.dtype,
      conv_impl=self.conv_impl,
      strides=self.strides,
      name="decoder",
    )(skips)
