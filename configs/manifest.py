"""Any pre/post collection listed in a CSV manifest with columns case_id,pre,post,label.

Labels are binary lesion masks (0 background, 1 lesion); relative paths are read
relative to the CSV's folder.

  python -m resfuse_jax.main --config=configs/manifest.py \
      --config.data.manifest=/data/inhouse/cases.csv --workdir=runs/inhouse
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def get_config(arg: str | None = None):
  model, options = common.parse_arg(arg)
  c = common.base_config(model)
  c.data.name = "manifest"
  c.data.manifest = ""
  common.apply_dce_defaults(c)
  if "smoke" in options:
    common.apply_smoke(c)
  return c
