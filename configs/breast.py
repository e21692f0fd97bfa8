"""Breast DCE-MRI in the MAMA-MIA layout: pre = _0000, post = _0001 (data.post_phase).

  python -m resfuse_jax.main --config=configs/breast.py \
      --config.data.root=/data/MAMA-MIA --workdir=runs/breast
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def get_config(arg: str | None = None):
  model, options = common.parse_arg(arg)
  c = common.base_config(model)
  c.data.name = "breast"
  c.data.root = os.environ.get("BREAST_ROOT", "")
  c.data.post_phase = 1  # _0001: the first post-contrast phase
  common.apply_dce_defaults(c)
  if "smoke" in options:
    common.apply_smoke(c)
  return c
