"""Region-based segmentation loss: soft Dice + binary cross-entropy on sigmoid outputs."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax


def labels_to_regions(label: jax.Array, regions: Sequence[Sequence[int]]) -> jax.Array:
  """[B, D, H, W] integer labels -> [B, D, H, W, R] float32 region masks.

  Regions overlap (BraTS: WT ⊃ TC ⊃ ET), hence sigmoids, not a softmax.
  """
  masks = [jnp.isin(label, jnp.asarray(values)) for values in regions]
  return jnp.stack(masks, axis=-1).astype(jnp.float32)


def soft_dice_loss(logits: jax.Array, targets: jax.Array, smooth: float = 1e-5) -> jax.Array:
  """1 - mean over regions of the batch soft Dice (sums over batch and voxels).

  Batch Dice (nnU-Net) keeps patches that miss a small region from producing
  0/0-dominated gradients.
  """
  probs = jax.nn.sigmoid(logits)
  axes = tuple(range(logits.ndim - 1))
  inter = jnp.sum(probs * targets, axes)
  denom = jnp.sum(probs, axes) + jnp.sum(targets, axes)
  dice = (2.0 * inter + smooth) / (denom + smooth)
  return 1.0 - jnp.mean(dice)


def dice_bce_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict]:
  """Returns the total loss and its parts (for logging)."""
  dice = soft_dice_loss(logits, targets)
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
  return dice + bce, {"dice_loss": dice, "bce_loss": bce}


def total_loss(
  logits: jax.Array, aux_logits: Sequence[jax.Array], targets: jax.Array, aux_weight: float
) -> tuple[jax.Array, dict]:
  """Main loss + ``aux_weight`` x each auxiliary output's loss (every output on the targets).

  A2FSeg weights each supervised branch about as much as the final output;
  LiTS supervises its coarse prediction beside the refined one.
  """
  loss, parts = dice_bce_loss(logits, targets)
  aux = sum((dice_bce_loss(a, targets)[0] for a in aux_logits), jnp.zeros(()))
  return loss + aux_weight * aux, {**parts, "aux_loss": aux}
