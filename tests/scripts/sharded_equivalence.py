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


def resident_cases(n=6, shape=(24, 28, 20)):
  """Random cases for the resident set: its crops are drawn inside the step."""
  from resfuse_jax.data.common import Case

  rng = np.random.default_rng(1)
  cases = []
  for i in range(n):
    label = rng.integers(0, 4, size=shape).astype(np.uint8) * (rng.random(shape) < 0.3)
    pre = rng.normal(size=shape).astype(np.float32)
    box = tuple((0, s) for s in shape)
    cases.append(Case(f"r{i}", pre, pre + (label == 3), label, (1.0,) * 3, np.eye(4), shape, box))
  return cases


def run_resident(config, data, spatial, steps, layout="replicated"):
  """The same training with the set resident: every row drawn and cut inside the step."""
  from resfuse_jax.data import resident as packing
  from resfuse_jax.train import resident

  mesh = sharding.make_mesh(ml_mesh(data, spatial))
  task = Task.from_config(config)
  tx = train.make_optimizer(config.train)
  init = functools.partial(train.init_state, task.model, tx, tuple(config.data.patch_size))
  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
  if layout == "sharded":
    arrays, _ = resident.place_sharded(
      resident_cases(), task.regions, task.patch_size, task.crop_shape, "float32", mesh
    )
  else:
    packed = packing.pack(resident_cases(), task.regions, task.patch_size, task.crop_shape)
    arrays = resident.to_device(packed, sharding.replicated(mesh))
  step = train.compile_train_step(config, task.model, tx, REGIONS, mesh, resident_layout=layout)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, arrays)
    losses.append(float(metrics.compute()["loss"]))
  return losses, jax.device_get(state.params)


def sharded_reference_batches(config, shards, steps):
  """What a sharded resident run's rows must be, drawn on one device shard by shard: row r
  of the global batch belongs to data shard r // (batch / shards) and is drawn, with the
  key (seed, step, r), from that shard's cases alone."""
  from resfuse_jax.data import resident as packing
  from resfuse_jax.train import resident

  task = Task.from_config(config)
  cases, batch = resident_cases(), config.train.batch_size
  size = packing.padded_shape([c.pre.shape for c in cases], task.patch_size, task.crop_shape)
  per_shard = []
  for d in range(shards):
    members = [cases[i] for i in packing.shard_members(len(cases), shards, d)]
    arrays = resident.to_device(
      packing.pack(members, task.regions, task.patch_size, task.crop_shape, size=size)
    )
    per_shard.append({**arrays, "count": np.array([len(members)], np.int32)})
  rows = batch // shards
  for step in range(steps):
    keys = resident.sample_keys(config.seed, step, batch)
    parts = [
      resident.sample_crops(
        per_shard[d],
        keys[d * rows : (d + 1) * rows],
        task.patch_size,
        task.crop_shape,
        config.data.fg_fraction,
      )
      for d in range(shards)
    ]
    yield {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def run_batches(config, batches_, steps):
  """Training on one device from given host crops."""
  mesh = sharding.make_mesh(ml_mesh(1, 1))
  task = Task.from_config(config)
  tx = train.make_optimizer(config.train)
  init = functools.partial(train.init_state, task.model, tx, tuple(config.data.patch_size))
  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
  step = train.compile_train_step(config, task.model, tx, REGIONS, mesh)
  losses = []
  for b in batches_:
    state, metrics = step(state, sharding.put_batch(b, train.input_sharding(config, mesh)))
    losses.append(float(metrics.compute()["loss"]))
  return losses, jax.device_get(state.params)


def compared(losses, params, ref_losses, ref_params):
  diffs = jax.tree.leaves(
    jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
  )
  return {
    "losses": losses,
    "ref_losses": ref_losses,
    "max_param_diff": max(diffs),
    "param_scale": max(float(np.max(np.abs(p))) for p in jax.tree.leaves(ref_params)),
  }


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
  out["resident_data8"] = compared(
    *run_resident(config, 8, 1, steps), *run_resident(config, 1, 1, steps)
  )
  # Sharded over 4 data shards (6 cases: 2, 2, 1, 1 each), each replicated over 'spatial'.
  out["resident_sharded_data4_spatial2"] = compared(
    *run_resident(config, 4, 2, steps, "sharded"),
    *run_batches(config, sharded_reference_batches(config, 4, steps), steps),
  )
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
