"""TSF-Seq2Seq's task-specific fusion (Han et al., MICCAI 2023), for segmentation.

One encoder shared by every sequence (both run in one batched call). A task
code (learned; in TSF-Seq2Seq the one-hot target task and the availability
mask) gives softmax weights over the sequences, and each encoder level's
features are fused with them. A task-specific attention block then adds a
residual refinement: a conv over the concatenated sequence features, CBAM
channel attention conditioned on the task code, and spatial attention. One
ResUNet decoder segments both the refined skips (the output) and the plain
fused ones (sown into ``aux_logits``: TSF-Seq2Seq trains both paths), in one
batched call.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resfuse_jax.models import layers
from resfuse_jax.models.resunet import ResUNetEncoder

TASK_CODE_DIM = 8
NUM_SEQUENCES = 2  # pre, post


class TaskAttention(nn.Module):
  """Residual refinement: conv over all sequences, task-conditioned channel, then spatial att."""

  features: int
  reduction: int = 4
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, sequences: jax.Array, task_code: jax.Array) -> jax.Array:
    """sequences: [B, D, H, W, M*C] -> residual [B, D, H, W, C]."""
    conv = functools.partial(layers.Conv3, dtype=self.dtype, conv_impl=self.conv_impl)
    x = nn.leaky_relu(conv(self.features, name="conv")(sequences), 0.2)
    b = x.shape[0]
    code = jnp.broadcast_to(task_code, (b, task_code.shape[-1]))
    hidden = nn.Dense(max(self.features // self.reduction, 2), name="channel_fc1")
    out = nn.Dense(self.features, name="channel_fc2")

    def mlp(pooled):  # shared by the average- and max-pooled descriptors (CBAM)
      return out(nn.leaky_relu(hidden(jnp.concatenate([pooled, code], axis=-1)), 0.2))

    channel = nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2, 3))) + mlp(jnp.max(x, axis=(1, 2, 3))))
    x = x * channel[:, None, None, None, :].astype(x.dtype)
    maps = jnp.concatenate(
      [jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)], axis=-1
    )
    return x * nn.sigmoid(conv(1, use_bias=False, name="spatial")(maps))


class TSFSeq2Seq(layers.TwoSequenceModel):
  @nn.compact
  def __call__(self, pre: jax.Array, post: jax.Array) -> jax.Array:
    n = pre.shape[0]
    both = jnp.concatenate([pre, post], axis=0).astype(self.dtype)  # [2B, ...]: one shared call
    impl, strides = self.conv_impl, self.strides
    encoded = ResUNetEncoder(
      self.features, self.dtype, self.remat, conv_impl=impl, strides=strides, name="encoder"
    )(both)
    task_code = self.param("task_code", nn.initializers.normal(1.0), (TASK_CODE_DIM,))
    weights = jax.nn.softmax(nn.Dense(NUM_SEQUENCES, name="sequence_weights")(task_code))
    self.sow("intermediates", "sequence_contributions", weights)  # [pre, post] contributions
    plain, refined = [], []
    for level, (feats, e) in enumerate(zip(self.features, encoded)):
      e_pre, e_post = e[:n], e[n:]
      fused = weights[0] * e_pre + weights[1] * e_post
      attention = TaskAttention(
        feats, dtype=self.dtype, conv_impl=self.conv_impl, name=f"attention{level}"
      )
      plain.append(fused)
      refined.append(fused + attention(jnp.concatenate([e_pre, e_post], -1), task_code))
    skips = [jnp.concatenate([r, p], axis=0) for r, p in zip(refined, plain)]
    logits = layers.Decoder(
      self.features, self.num_outputs, self.dtype, conv_impl=impl, strides=strides, name="decoder"
    )(skips)
    self.sow("aux_logits", "without_attention", logits[n:])
    return logits[:n]
