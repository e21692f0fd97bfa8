"""BraTS 2023 adult glioma (GLI): pre = t1n, post = t1c; regions WT, TC, ET.

  python -m resfuse_jax.main --config=brats \
      --config.data.root=/data/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData --workdir=runs/brats
"""

from __future__ import annotations

import os

from resfuse_jax import config_lib


def get_config(arg: str | None = None):
  model, options = config_lib.parse_arg(arg)
  c = config_lib.base_config(model)
  c.data.name = "brats"
  c.data.root = os.environ.get("BRATS_ROOT", "")
  c.data.patch_size = (128, 128, 128)
  c.model.features = (16, 32, 64, 128, 256)
  if "smoke" in options:
    config_lib.apply_smoke(c)
  return c
