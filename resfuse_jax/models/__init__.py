"""Model registry: every network is built by name from ``config.model``.

Every model maps ``(pre, post)`` [B, D, H, W, 1] to region logits
[B, D, H, W, R]; models trained with auxiliary losses (deep supervision, coarse
predictions) sow those extra logits into the ``aux_logits`` collection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resfuse_jax.models.a2fnet import A2FNet
from resfuse_jax.models.lits import LiTS
from resfuse_jax.models.resfuse import ResFuse
from resfuse_jax.models.resunet import ResUNet
from resfuse_jax.models.tsf_seq2seq import TSFSeq2Seq


def _resunet(cfg: Any, num_outputs: int, dtype: Any) -> nn.Module:
  return ResUNet(tuple(cfg.features), num_outputs, "post", dtype, cfg.get("remat", False))


def _resunet_early(cfg: Any, num_outputs: int, dtype: Any) -> nn.Module:
  return ResUNet(tuple(cfg.features), num_outputs, "pre+post", dtype, cfg.get("remat", False))


def _resfuse(cfg: Any, num_outputs: int, dtype: Any) -> nn.Module:
  levels = cfg.get("fuse_levels", None)
  return ResFuse(
    tuple(cfg.features),
    num_outputs,
    fusion=cfg.get("fusion", "conv"),
    fuse_levels=None if levels is None else tuple(levels),
    dtype=dtype,
    remat=cfg.get("remat", False),
  )


def _baseline(cls: type[nn.Module]) -> Callable[[Any, int, Any], nn.Module]:
  return lambda cfg, num_outputs, dtype: cls(
    tuple(cfg.features), num_outputs, dtype=dtype, remat=cfg.get("remat", False)
  )


_REGISTRY: dict[str, Callable[[Any, int, Any], nn.Module]] = {
  "resfuse": _resfuse,
  "resunet": _resunet,
  "resunet_early": _resunet_early,
  "a2fnet": _baseline(A2FNet),
  "tsf_seq2seq": _baseline(TSFSeq2Seq),
  "lits": _baseline(LiTS),
}


def names() -> list[str]:
  return sorted(_REGISTRY)


def build(model_config: Any, num_outputs: int, dtype: Any = jnp.float32) -> nn.Module:
  """Builds ``model_config.name``; unknown names raise listing the valid ones."""
  name = model_config.name
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model.name {name!r}; registered models: {', '.join(names())}")
  return _REGISTRY[name](model_config, num_outputs, dtype)
