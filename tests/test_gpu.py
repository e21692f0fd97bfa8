"""The whole path on a CUDA GPU (``pytest -m gpu``; benchmarks/gpu_check.sh runs it).

A 20-step bf16 phantom training with nnU-Net's augmentation on the device, `predict`
on a case, and `export` reloaded and called on the GPU. Each test also runs on the
CPU (4 steps, in CI): the same assertions, keys and tolerances, so a GPU run never
meets a broken test again (the first H200 run read a key results.json did not have).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

PLATFORMS = [
  pytest.param("cpu"),
  pytest.param(
    "gpu",
    marks=[
      pytest.mark.gpu,
      pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
    ],
  ),
]
STEPS = {"cpu": 4, "gpu": 20}


def run(platform, module, *args):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", module, *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  return proc


@pytest.fixture(scope="module", params=PLATFORMS)
def gpu_run(request, tmp_path_factory):
  platform, steps = request.param, STEPS[request.param]
  workdir = tmp_path_factory.mktemp(platform) / "run"
  proc = run(
    platform,
    "resfuse_jax.main",
    "--config=configs/phantom.py:resfuse,smoke",
    f"--workdir={workdir}",
    f"--config.train.steps={steps}",
    f"--config.train.log_every={steps // 2}",
    "--config.train.compute_dtype=bfloat16",
    "--config.data.augment.preset=nnunet",
    f"--config.eval.every_steps={steps}",
    f"--config.checkpoint.every_steps={steps // 2}",
  )
  return platform, workdir, proc


def test_bf16_training_with_device_augmentation_runs_on_the_gpu(gpu_run):
  platform, workdir, proc = gpu_run
  devices = {"gpu": ("cuda", "gpu"), "cpu": ("cpu",)}[platform]
  assert any(d in proc.stderr.lower() for d in devices)  # the logged devices
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["compute_dtype"] == "bfloat16"
  results = json.loads((workdir / "results.json").read_text())
  assert results["steps"] == STEPS[platform]  # results.json's contract key (DESIGN.md §3)
  assert all(np.isfinite(v) for v in results["dice"].values())


def test_predict_on_the_gpu_writes_a_label_map(gpu_run, small_phantom, tmp_path):
  platform, workdir, _ = gpu_run
  root, _ = small_phantom
  case = sorted(p for p in root.iterdir() if p.is_dir())[0]
  out = tmp_path / "seg.nii.gz"
  run(
    platform,
    "resfuse_jax.predict",
    f"--workdir={workdir}",
    f"--pre={case / f'{case.name}-t1n.nii.gz'}",
    f"--post={case / f'{case.name}-t1c.nii.gz'}",
    f"--out={out}",
  )
  labels = np.asarray(nib.load(out).dataobj)
  assert labels.shape == (32, 32, 32) and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_the_export_reloads_and_runs_on_the_gpu(gpu_run, tmp_path):
  from resfuse_jax.inference import predictor
  from resfuse_jax.inference.predictor import Predictor
  from resfuse_jax.serving import exporting

  platform, workdir, _ = gpu_run
  out = tmp_path / "model"
  run(platform, "resfuse_jax.export", f"--workdir={workdir}", f"--output={out}")
  loaded = Predictor.load(out)
  patch = tuple(loaded.config.data.patch_size)
  tiles = np.random.default_rng(0).normal(size=(3, *patch, 2)).astype(np.float32)
  device = jax.devices(platform)[0]
  served = exporting.load_serving(out).call(jax.device_put(tiles, device))
  assert served.devices() == {device}
  expected = np.asarray(predictor.window_probabilities(loaded.model, loaded.params, tiles))
  served = np.asarray(served)
  # Both run the same bf16 network, but as two XLA programs whose fusions round in a
  # different order: each layer's activations differ by bf16 roundings (eps = 2^-7, 8
  # significand bits), which add up through the network. Allow 4 bf16 epsilons of the
  # largest value compared (1.0 for probabilities: 0.031; the first H200 run saw 0.0204).
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  np.testing.assert_allclose(served, expected, rtol=0, atol=4 * eps * np.abs(expected).max())
