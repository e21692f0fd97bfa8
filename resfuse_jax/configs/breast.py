"""Breast DCE-MRI in the MAMA-MIA layout: pre = _0000, post = _0001 (data.post_phase).

  python -m resfuse_jax.main --config=breast \
      --config.data.root=/data/MAMA-MIA --workdir=runs/breast
"""

from __future__ import annotations

import os

from resfuse_jax import config_lib


def get_config(arg: str | None = None):
  model, options = config_lib.parse_arg(arg)
  c = config_lib.base_config(model)
  c.data.name = "breast"
  c.data.root = os.environ.get("BREAST_ROOT", "")
  c.data.post_phase = 1  # _0001: the first post-contrast phase
  config_lib.apply_dce_defaults(c)
  if "smoke" in options:
    config_lib.apply_smoke(c)
  return c
