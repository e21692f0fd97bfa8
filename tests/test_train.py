import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, smoke_config

from resfuse_jax import checkpointing, losses, models, train
from resfuse_jax.data import brats, pipeline

REGIONS = tuple(brats.REGIONS.values())


@pytest.fixture(scope="module")
def setup(small_cases):
  cfg = smoke_config(**{"train.lr": 1e-2, "train.steps": 200, "train.warmup_steps": 0})
  model = models.build(cfg.model, len(REGIONS))
  tx = train.make_optimizer(cfg.train)
  ds = pipeline.train_dataset(
    small_cases[:1],
    patch_size=(16, 16, 16),
    batch_size=2,
    regions=brats.REGIONS,
    fg_fraction=1.0,
    seed=0,
  )
  batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
  params = model.init(jax.random.key(0), batch["pre"], batch["post"])["params"]
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, regions=REGIONS))
  return model, state, step, batch


def test_one_step_lowers_the_loss_on_a_fixed_batch(setup):
  _, state, step, batch = setup
  s1, m1 = step(state, batch)
  _, m2 = step(s1, batch)
  assert int(s1.step) == 1
  assert float(m2.compute()["loss"]) < float(m1.compute()["loss"])


def test_tiny_model_overfits_one_phantom_case(setup):
  model, state, step, batch = setup
  for _ in range(120):
    state, _ = step(state, batch)
  logits = model.apply({"params": state.params}, batch["pre"], batch["post"])
  pred = np.asarray(logits > 0)
  target = np.asarray(losses.labels_to_regions(batch["label"], REGIONS)) > 0.5
  dice_wt = 2 * (pred[..., 0] & target[..., 0]).sum() / (pred[..., 0].sum() + target[..., 0].sum())
  assert dice_wt > 0.9


def test_checkpoint_restore_gives_identical_params_and_data_position(setup, small_cases, tmp_path):
  _, state, step, batch = setup
  state, _ = step(state, batch)
  it = iter(
    pipeline.train_dataset(
      small_cases,
      patch_size=(16,) * 3,
      batch_size=2,
      regions=brats.REGIONS,
      fg_fraction=0.5,
      seed=1,
    )
  )
  next(it)
  manager = checkpointing.make_manager(tmp_path / "ckpt", keep=2)
  checkpointing.save(manager, 1, state, it)
  manager.wait_until_finished()
  expected_next = next(it)

  fresh = iter(
    pipeline.train_dataset(
      small_cases,
      patch_size=(16,) * 3,
      batch_size=2,
      regions=brats.REGIONS,
      fg_fraction=0.5,
      seed=1,
    )
  )
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored = checkpointing.restore_train_state(manager, 1, abstract, fresh)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(next(fresh)["post"], expected_next["post"])
  manager.close()


def run_cli(workdir, *overrides, config="configs/phantom.py:resfuse,smoke", check=True, devices=1):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
  cmd = [
    sys.executable,
    "-m",
    "resfuse_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
  return proc


def test_cli_end_to_end_and_resume(tmp_path):
  workdir = tmp_path / "run"
  run_cli(workdir, "--config.train.steps=2", "--config.checkpoint.every_steps=1")
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["name"] == "resfuse" and config["train"]["steps"] == 2
  assert config["model"]["conv_impl"] == os.environ.get("RESFUSE_CONV_IMPL", "auto")
  splits = json.loads((workdir / "splits.json").read_text())
  assert splits["train"] and splits["val"] and not set(splits["train"]) & set(splits["val"])
  assert (workdir / "checkpoints" / "2" / "state").is_dir()
  assert list(workdir.glob("events.out.tfevents.*"))
  results = json.loads((workdir / "results.json").read_text())
  assert set(results) >= {"model", "dataset", "steps", "params", "dice", "recall", "hd95", "cases"}
  assert results["steps"] == 2 and results["dataset"] == "phantom" and results["cases"] == 2
  for metric in ("dice", "recall"):
    assert set(results[metric]) == {"WT", "TC", "ET", "mean"}
    assert all(0.0 <= v <= 1.0 for v in results[metric].values())
  assert results["params"] > 0

  # A half-written step (as a kill -9 mid-save leaves) must not be picked up; the resumed
  # run shards each batch over 2 devices (mesh.data = -1) and restores onto that mesh.
  (workdir / "checkpoints" / "3.orbax-checkpoint-tmp-123").mkdir()
  proc = run_cli(workdir, "--config.train.steps=4", "--config.checkpoint.every_steps=1", devices=2)
  assert "CpuDevice(id=1)" in proc.stderr
  assert "Resumed from" in proc.stderr and "at step 2" in proc.stderr
  assert "step 2/4" not in proc.stderr and "step 4/4" in proc.stderr
  assert json.loads((workdir / "results.json").read_text())["steps"] == 4


def test_brats_without_data_says_where_to_get_it(tmp_path):
  proc = run_cli(
    tmp_path / "w",
    f"--config.data.root={tmp_path}/missing",
    config="configs/brats.py:resfuse,smoke",
    check=False,
  )
  assert proc.returncode != 0
  assert "BraTS data folder not found" in proc.stderr
  assert "--config.data.root" in proc.stderr and "--config=phantom " in proc.stderr
  assert "Traceback" not in proc.stderr
