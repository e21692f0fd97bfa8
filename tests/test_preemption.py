"""Preemption-safe exact resume, and a non-finite loss that stops training cleanly."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, smoke_config
from test_train import run_cli

from resfuse_jax import checkpointing, sharding, train
from resfuse_jax.inference.predictor import Predictor

STEPS = 8
ARGS = [
  f"--config.train.steps={STEPS}",
  "--config.train.log_every=1",
  "--config.checkpoint.every_steps=100",  # only the preemption save and the final one
  "--config.eval.every_steps=100",
  # The phantom's `light` augmentation (mirroring) runs on the device, drawn from (seed, step,
  # row): resuming must draw the same. (nnU-Net's full set shares those keys; its compile
  # would add half a minute to each of the three runs here.)
  "--config.data.augment.preset=light",
]


def final_params(workdir):
  predictor = Predictor.load(workdir)
  assert predictor.step == STEPS
  return jax.tree.leaves(predictor.params)


def test_sigterm_saves_at_the_step_boundary_and_resume_is_exact(tmp_path):
  run_cli(tmp_path / "straight", *ARGS)

  workdir = tmp_path / "preempted"
  cmd = [
    sys.executable,
    "-m",
    "resfuse_jax.main",
    "--config=configs/phantom.py:resfuse,smoke",
    f"--workdir={workdir}",
    *ARGS,
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:  # absl logs to stderr
    seen.append(line)
    if f"step 3/{STEPS}" in line:
      proc.send_signal(signal.SIGTERM)
      break
  _, rest = proc.communicate(timeout=300)
  log = "".join(seen) + rest
  assert proc.returncode == 0, log[-3000:]
  assert "stopped by SIGTERM at step" in log and "rerun the same command to resume" in log
  stopped_at = int(log.split("stopped by SIGTERM at step ")[1].split("/")[0])
  assert 3 <= stopped_at < STEPS
  manager = checkpointing.make_manager(workdir / "checkpoints", keep=2)
  assert manager.latest_step() == stopped_at
  manager.close()
  assert not (workdir / "results.json").exists()

  resumed = run_cli(workdir, *ARGS)
  assert f"at step {stopped_at}" in resumed.stderr
  for a, b in zip(final_params(tmp_path / "straight"), final_params(workdir)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
  tmp_path, monkeypatch
):
  real_put = sharding.put_batch
  calls = {"n": 0}

  def poisoned(batch, shard):
    calls["n"] += 1
    if calls["n"] == 3:  # step 3 sees a NaN voxel
      batch = dict(batch, pre=np.where(np.ones_like(batch["pre"], bool), np.nan, batch["pre"]))
    return real_put(batch, shard)

  monkeypatch.setattr(sharding, "put_batch", poisoned)
  config = smoke_config(**{"train.steps": 5, "checkpoint.every_steps": 1, "train.log_every": 100})
  with pytest.raises(FloatingPointError, match="at step 3 .*last good checkpoint is kept: step 2"):
    train.train_and_evaluate(config, str(tmp_path))
  params = Predictor.load(tmp_path).params
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
