"""The built-in brain-tumour phantom: trains on 2 CPU cores in a few minutes.

python -m resfuse_jax.main --config=phantom --workdir=runs/phantom
python -m resfuse_jax.main --config=phantom:resunet --workdir=runs/phantom_resunet
"""

from __future__ import annotations

from resfuse_jax import config_lib
from resfuse_jax.data import phantom


def get_config(arg: str | None = None):
  model, options = config_lib.parse_arg(arg)
  c = config_lib.base_config(model)
  c.data.name = "phantom"
  c.data.root = ""  # "" = a cache folder named by the phantom's spec (see README)
  c.data.phantom_cases = 40
  c.data.phantom_shape = (48, 48, 48)
  c.data.phantom_seed = 0
  c.data.patch_size = (24, 24, 24)
  # Acquisition knobs (resfuse_jax/data/phantom.py KNOBS): how pre differs from post. All 0 =
  # voxel-aligned scans sharing bias field and noise level. Sweep them with
  # `python -m resfuse_jax.compare --sweep=data.misregistration_mm=0,2,4 ...`.
  for knob in phantom.KNOBS:
    c.data[knob] = 0.0

  c.model.features = (8, 16, 32)
  c.train.steps = 600
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.log_every = 50
  c.eval.every_steps = 200
  c.eval.max_cases = 0
  c.checkpoint.every_steps = 200
  # Mirroring only: at this 600-step demo budget stronger augmentation slows both models'
  # convergence (measured, BUILD_NOTES.md §2); the real-data configs use nnU-Net's set.
  c.data.augment.preset = "light"
  if "smoke" in options:
    config_lib.apply_smoke(c)
    c.data.phantom_cases = 10
    c.data.phantom_shape = (32, 32, 32)
  return c
