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


def resident_rows(config, steps=2):
  """The resident sampler's rows on meshes against one device, exactly (no training: the
  step after the sampler is the host path's, compared above; the 2-process test trains).

  replicated_data8: the whole set on 8 devices, each cutting its own row, gives the rows of
  one device (keys from seed, step and row only). sharded_data4_spatial2: 6 cases dealt over
  4 data shards (2, 2, 1, 1 each), replicated over 'spatial': row r is drawn, with the key
  (seed, step, r), from the cases of shard r // 2 alone, which one device checks by drawing
  it from that shard's cases packed apart.
  """
  from resfuse_jax.data import resident as packing
  from resfuse_jax.train import resident

  task = Task.from_config(config)
  cases, batch = resident_cases(), config.train.batch_size
  patch, crop, fg = task.patch_size, task.crop_shape, config.data.fg_fraction
  one_device = resident.to_device(packing.pack(cases, task.regions, patch, crop))
  size = packing.padded_shape([c.pre.shape for c in cases], patch, crop)
  shards = 4
  per_shard = []
  for d in range(shards):
    members = [cases[i] for i in packing.shard_members(len(cases), shards, d)]
    arrays = resident.to_device(packing.pack(members, task.regions, patch, crop, size=size))
    per_shard.append({**arrays, "count": np.array([len(members)], np.int32)})
  meshes = {
    "replicated_data8": (sharding.make_mesh(ml_mesh(8, 1)), "replicated"),
    "sharded_data4_spatial2": (sharding.make_mesh(ml_mesh(4, 2)), "sharded"),
  }
  placed = {
    "replicated_data8": resident.to_device(
      packing.pack(cases, task.regions, patch, crop),
      sharding.replicated(meshes["replicated_data8"][0]),
    ),
    "sharded_data4_spatial2": resident.place_sharded(
      cases, task.regions, patch, crop, "float32", meshes["sharded_data4_spatial2"][0]
    )[0],
  }
  out = {name: {"max_diff": 0.0, "row_devices": []} for name in meshes}
  rows = batch // shards
  for step in range(steps):
    keys = resident.sample_keys(config.seed, step, batch)
    expected = {
      "replicated_data8": resident.sample_crops(one_device, keys, patch, crop, fg),
      "sharded_data4_spatial2": {
        k: np.concatenate([
          np.asarray(resident.sample_crops(
            per_shard[d], keys[d * rows : (d + 1) * rows], patch, crop, fg
          )[k])
          for d in range(shards)
        ])
        for k in ("pre", "post", "label")
      },
    }  # fmt: skip
    for name, (mesh, layout) in meshes.items():
      draw = jax.jit(
        functools.partial(
          resident.sample_crops_on_mesh, mesh=mesh, layout=layout, patch=patch, crop=crop,
          fg_fraction=fg,
        )
      )  # fmt: skip
      got = draw(placed[name], keys)
      for k in ("pre", "post", "label"):
        diff = np.abs(np.asarray(got[k], np.float32) - np.asarray(expected[name][k], np.float32))
        out[name]["max_diff"] = max(out[name]["max_diff"], float(diff.max()))
      out[name]["row_devices"] = sorted(
        {s.data.shape[0] for s in got["pre"].addressable_shards}
      )  # rows each device holds
  return out


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
  out["resident"] = resident_rows(config)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
