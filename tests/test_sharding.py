"""Sharding from config: 8 simulated CPU devices give the 1-device result."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import ROOT

from resfuse_jax import sharding


@pytest.fixture(scope="module")
def sharded_runs():
  # The script builds with XLA's 3D conv (model.conv_impl = xla), the accelerators' path. The
  # CPU rewrite under several processes is covered by test_launch.py.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run(
    [sys.executable, "tests/scripts/sharded_equivalence.py"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("mesh", ["data8", "data4_spatial2"])
def test_sharded_training_matches_one_device(sharded_runs, mesh):
  assert sharded_runs["devices"] == 8
  run = sharded_runs[mesh]
  np.testing.assert_allclose(run["losses"], run["ref_losses"], rtol=1e-5)
  assert run["max_param_diff"] < 1e-5 * run["param_scale"]


@pytest.mark.parametrize("mesh", ["replicated_data8", "sharded_data4_spatial2"])
def test_resident_rows_on_a_mesh_are_the_rows_one_device_draws(sharded_runs, mesh):
  """Each device cuts only its own rows (1 of 8; 2 of 8 on each of 4 data shards), and they
  are exactly one device's: from the whole set (replicated), or from the cases of the row's
  own data shard (sharded; see the script's resident_rows)."""
  run = sharded_runs["resident"][mesh]
  assert run["max_diff"] == 0.0
  assert run["row_devices"] == ([1] if mesh == "replicated_data8" else [2])


def test_each_device_holds_its_share_of_the_activations(sharded_runs):
  """Batch 8 over 'data' (and depth 16 over 'spatial'): the per-device conv operands."""
  assert any(s.startswith("f32[1,16,16,16,") for s in sharded_runs["data8"]["conv_shapes"])
  spatial = sharded_runs["data4_spatial2"]["conv_shapes"]
  assert any(s.startswith("f32[2,8,16,16,") for s in spatial), spatial
  assert not any(s.startswith("f32[2,16,16,16,") for s in spatial)


def mesh_config(data, spatial=1):
  return ml_collections.ConfigDict({"data": data, "spatial": spatial})


def test_mesh_fills_the_devices_and_rejects_what_does_not_fit():
  mesh = sharding.make_mesh(mesh_config(-1))
  assert mesh.shape == {"data": jax.device_count(), "spatial": 1}
  with pytest.raises(ValueError, match="mesh.data=3"):
    sharding.make_mesh(mesh_config(3), devices=jax.devices() * 2)
  with pytest.raises(ValueError, match="mesh.spatial=3"):
    sharding.make_mesh(mesh_config(-1, 3), devices=jax.devices() * 2)


def test_patch_depth_must_split_over_the_spatial_axis():
  mesh = sharding.make_mesh(mesh_config(1))
  sharding.check_patch_size((16, 16, 16), 4, mesh)
  with pytest.raises(ValueError, match="divisible by mesh.spatial"):
    sharding.check_patch_size((18, 16, 16), 4, mesh)
