"""Model registry: every network is built by name from ``config.model``.

Every model maps ``(pre, post)`` [B, D, H, W, 1] to region logits
[B, D, H, W, R]; models trained with auxiliary losses (deep supervision, coarse
predictions) sow those extra logits into the ``aux_logits`` collection, and
fusion models sow each fused level's auxiliary term into ``FUSION_TERMS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resfuse_jax import backend as backends
from resfuse_jax.errors import ConfigError
from resfuse_jax.models import convolution, layers
from resfuse_jax.models.a2fnet import A2FNet
from resfuse_jax.models.layers import FUSION_TERMS
from resfuse_jax.models.lits import LiTS
from resfuse_jax.models.resfuse import ResFuse
from resfuse_jax.models.resunet import ResUNet
from resfuse_jax.models.tsf_seq2seq import TSFSeq2Seq

__all__ = ["FUSION_TERMS", "build", "compute_dtype", "count_params", "fusion_weight_norms", "names"]

# (model config, num_outputs, dtype, resolved convolution.ConvPlan) -> module
Builder = Callable[[Any, int, Any, convolution.ConvPlan], nn.Module]


def _strides(cfg: Any) -> tuple | None:
  """``model.strides`` as per-level triples (checked), None for the isotropic U-Net.

  Configs written before per-axis strides have no such key: they are isotropic.
  """
  strides = cfg.get("strides")
  try:
    return None if strides is None else layers.level_strides(strides, len(cfg.features))
  except ValueError as e:
    raise ConfigError(f"config.model.strides={strides!r}: {e}") from None


def _resunet(inputs: str) -> Builder:
  return lambda cfg, num_outputs, dtype, conv_impl: ResUNet(
    tuple(cfg.features),
    num_outputs,
    inputs,
    dtype,
    cfg.remat,
    conv_impl=conv_impl,
    strides=_strides(cfg),
  )


def _resfuse(cfg: Any, num_outputs: int, dtype: Any, conv_impl: convolution.ConvPlan) -> nn.Module:
  levels = cfg.fuse_levels
  return ResFuse(
    tuple(cfg.features),
    num_outputs,
    fusion=cfg.fusion,
    fuse_levels=None if levels is None else tuple(levels),
    dtype=dtype,
    remat=cfg.remat,
    conv_impl=conv_impl,
    strides=_strides(cfg),
  )


def _baseline(cls: type[nn.Module]) -> Builder:
  return lambda cfg, num_outputs, dtype, conv_impl: cls(
    tuple(cfg.features),
    num_outputs,
    dtype=dtype,
    remat=cfg.remat,
    conv_impl=conv_impl,
    strides=_strides(cfg),
  )


_REGISTRY: dict[str, Builder] = {
  "resfuse": _resfuse,
  "resunet": _resunet("post"),
  "resunet_early": _resunet("pre+post"),
  "a2fnet": _baseline(A2FNet),
  "tsf_seq2seq": _baseline(TSFSeq2Seq),
  "lits": _baseline(LiTS),
}


def names() -> list[str]:
  return sorted(_REGISTRY)


def build(model_config: Any, num_outputs: int, dtype: Any = jnp.float32) -> nn.Module:
  """Builds ``model_config.name`` with its conv plan (`convolution.resolve_conv_plan`) for this backend.

  ``model_config``: a complete ``config.model`` (``config_lib`` owns the defaults).

  Unknown names or conv implementations raise ``ConfigError`` listing the valid ones.
  """
  name = model_config.name
  if name not in _REGISTRY:
    raise ConfigError(f"Unknown model.name {name!r}; registered models: {', '.join(names())}")
  plan = convolution.resolve_conv_plan(model_config)
  return _REGISTRY[name](model_config, num_outputs, dtype, plan)


def fusion_weight_norms(params: Any) -> dict[str, float]:
  """Frobenius norm of each level's learned 1x1x1 fusion kernel W_l; {} for other models.

  How much of the pre-contrast branch each level adds to the main branch, the
  quantity a robustness study follows as pre and post drift apart. Reads this
  process's copy of replicated parameters.
  """
  norms = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    if path[-1] == "kernel" and "fusion" in path and path[path.index("fusion") + 1] == "conv":
      kernel = np.asarray(leaf.addressable_data(0) if hasattr(leaf, "addressable_data") else leaf)
      norms[path[path.index("fusion") - 1]] = float(np.linalg.norm(kernel.astype(np.float64)))
  return dict(sorted(norms.items()))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params))


def compute_dtype(train_config: Any, backend: str | None = None) -> Any:
  """``train.compute_dtype`` (auto | float32 | bfloat16): activations and matmuls.

  Parameters stay float32. ``auto`` is the backend's default (`resfuse_jax.backend`).
  """
  name = train_config.compute_dtype
  return jnp.dtype(backends.resolve("compute_dtype", name, backend, "train.compute_dtype"))
