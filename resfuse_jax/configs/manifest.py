"""Any pre/post collection listed in a CSV manifest with columns case_id,pre,post,label.

Labels are binary lesion masks (0 background, 1 lesion); relative paths are read
relative to the CSV's folder.

  python -m resfuse_jax.main --config=manifest \
      --config.data.manifest=/data/inhouse/cases.csv --workdir=runs/inhouse
"""

from __future__ import annotations

from resfuse_jax import config_lib


def get_config(arg: str | None = None):
  model, options = config_lib.parse_arg(arg)
  c = config_lib.base_config(model)
  c.data.name = "manifest"
  c.data.manifest = ""
  c.data.label_names = "lesion"  # what label 1 marks: the segment label of a DICOM SEG
  config_lib.apply_dce_defaults(c)
  if "smoke" in options:
    config_lib.apply_smoke(c)
  return c
