"""A2FNet: A2FSeg's average + adaptive multi-modal fusion (Wang & Hong, MICCAI 2023).

One ResUNet per sequence (separate weights). Average fusion: every decoder
level's output (bottleneck included) is averaged over the sequences and a
fusion decoder runs on the averages, giving f_avg. Adaptive fusion: per
sequence, two conv3 on [f_m, f_avg] give an attention map per voxel and
channel; a softmax across sequences weights the sum of f_m; the head segments
[fused, f_avg]. As in A2FSeg every branch is supervised: the per-sequence and
average-fusion logits are sown into ``aux_logits`` for the training loss.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resfuse_jax.models import layers
from resfuse_jax.models.resunet import ResUNetEncoder

SEQUENCES = ("pre", "post")


class SequenceAttention(nn.Module):
  """Attention logits [B, D, H, W, C] of one sequence from [f_m, f_avg]."""

  features: int
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, own: jax.Array, average: jax.Array) -> jax.Array:
    conv = functools.partial(
      layers.Conv3, self.features, dtype=self.dtype, conv_impl=self.conv_impl
    )
    x = conv(name="conv_a")(jnp.concatenate([own, average], axis=-1))
    x = nn.relu(layers.instance_norm("norm", self.dtype)(x))
    return nn.relu(conv(name="conv_b")(x))


def adaptive_fusion_weights(attention_logits: list[jax.Array]) -> jax.Array:
  """Softmax across sequences per voxel and channel: M x [B, D, H, W, C] -> [M, B, D, H, W, C]."""
  return jax.nn.softmax(jnp.stack(attention_logits), axis=0)


class A2FNet(layers.TwoSequenceModel):
  @nn.compact
  def __call__(self, pre: jax.Array, post: jax.Array) -> jax.Array:
    impl = self.conv_impl
    levels = []  # per sequence: decoder outputs, full resolution first, bottleneck last
    for name, x in zip(SEQUENCES, (pre, post)):
      skips = ResUNetEncoder(
        self.features,
        self.dtype,
        self.remat,
        conv_impl=impl,
        strides=self.strides,
        name=f"{name}_encoder",
      )(x.astype(self.dtype))
      out = layers.Decoder(
        self.features,
        None,
        self.dtype,
        True,
        conv_impl=impl,
        strides=self.strides,
        name=f"{name}_decoder",
      )(skips)
      head = layers.SegmentationHead(self.num_outputs, self.dtype, name=f"{name}_head")
      self.sow("aux_logits", name, head(out[0]))
      levels.append(out)
    averaged = [jnp.mean(jnp.stack(per_level), axis=0) for per_level in zip(*levels)]
    average = layers.Decoder(
      self.features, None, self.dtype, conv_impl=impl, strides=self.strides, name="average_decoder"
    )(averaged)
    head = layers.SegmentationHead(self.num_outputs, self.dtype, name="average_head")
    self.sow("aux_logits", "average", head(average))
    feats = [out[0] for out in levels]  # [B, D, H, W, C0] per sequence
    logits = [
      SequenceAttention(self.features[0], self.dtype, conv_impl=impl, name=f"{name}_attention")(
        f, average
      )
      for name, f in zip(SEQUENCES, feats)
    ]
    weights = adaptive_fusion_weights(logits)
    self.sow("intermediates", "fusion_weights", weights)
    fused = jnp.sum(weights * jnp.stack(feats), axis=0)  # [B, D, H, W, C0]
    x = layers.Conv3(self.features[0], dtype=self.dtype, conv_impl=impl, name="fused_conv")(
      jnp.concatenate([fused, average], axis=-1)
    )
    return layers.SegmentationHead(self.num_outputs, self.dtype, name="fused_head")(x)
