"""Trains a few steps on 1 device and on 8-device meshes; prints the differences as JSON.

Run by tests/test_sharding.py in a fresh process (the device count is fixed when
JAX starts): ``JAX_NUM_CPU_DEVICES=8 python tests/scripts/sharded_equivalence.py``.
"""

import functools
import json

import jax
import numpy as np

from resfuse_jax import config_lib, sharding, train
from resfuse_jax.task import Task

REGIONS = ((1, 2, 3), (1, 3), (3,))
MESHES = {"data8": (8, 1), "data4_spatial2": (4, 2)}


def batches(n, crop, batch=8):
  """Host crops (with the augmentation margin) of random scans and labels."""
  rng = np.random.default_rng(0)
  for _ in range(n):
    pre = rng.normal(size=(batch, *crop, 1)).astype(np.float32)
    label = rng.integers(0, 4, size=(batch, *crop)).astype(np.uint8)
    yield {"pre": pre, "post": pre + (label[..., None] == 3), "label": label}


def run(config, data, spatial, steps):
  mesh = sharding.make_mesh(ml_mesh(data, spatial))
  task = Task.from_config(config)
  model = task.model
  tx = train.make_optimizer(config.train)
  init = functools.partial(train.init_state, model, tx, tuple(config.data.patch_size))
  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
  step = train.compile_train_step(config, model, tx, REGIONS, mesh)
  crop, in_sharding = task.crop_shape, train.input_sharding(config, mesh)
  losses = []
  for b in batches(steps, crop):
    state, metrics = step(state, sharding.put_batch(b, in_sharding))
    losses.append(float(metrics.compute()["loss"]))
  conv_inputs = sorted(
    {
      line.split("=")[1].split("{")[0].strip()
      for line in step.lower(state, sharding.put_batch(next(batches(1, crop)), in_sharding))
      .compile()
      .as_text()
      .splitlines()
      if "convolution(" in line and "f32[" in line.split("=")[1][:20]
    }
  )
  return losses, jax.device_get(state.params), conv_inputs


def ml_mesh(data, spatial):
  import ml_collections

  return ml_collections.ConfigDict({"data": data, "spatial": spatial})


def main():
  config = config_lib.load("configs/phantom.py:resfuse,smoke")
  config.model.conv_impl = "xla"  # its operands show the per-device shapes directly
  # SGD: Adam would normalise float noise on zero-gradient parameters (a conv bias before an
  # instance norm) into lr-sized updates, hiding real differences behind fake ones.
  config.train.optimizer = "sgd"
  config.train.warmup_steps = 0
  config.train.lr = 1e-1
  config.train.batch_size = 8
  # Augmentation inside the step on every row: the rows' draws, the resampling and the
  # per-sample statistics (contrast, gamma) must not depend on how the batch is split. Blur
  # and low resolution (local, fixed-shape stencils) are left out to keep the compile short.
  config.data.augment.preset = "nnunet"
  for name in ("p_rotation", "p_scale", "p_noise", "p_brightness", "p_contrast", "p_gamma"):
    config.data.augment[name] = 1.0
  config.data.augment.p_blur = config.data.augment.p_lowres = 0.0
  steps = 3
  out = {"devices": jax.device_count()}
  ref_losses, ref_params, _ = run(config, 1, 1, steps)
  for name, (data, spatial) in MESHES.items():
    losses, params, convs = run(config, data, spatial, steps)
    diffs = jax.tree.leaves(
      jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
    )
    scale = max(float(np.max(np.abs(p))) for p in jax.tree.leaves(ref_params))
    out[name] = {
      "losses": losses,
      "ref_losses": ref_losses,
      "max_param_diff": max(diffs),
      "param_scale": scale,
      "conv_shapes": convs,
    }
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
