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
  # DCE-MRI is anisotropic and its spacing varies by scanner: resample to one grid.
  c.data.target_spacing = (1.0, 1.0, 1.0)
  c.data.patch_size = (128, 128, 64)
  c.model.features = (16, 32, 64, 128, 256)
  if "smoke" in options:
    common.apply_smoke(c)
  return c
