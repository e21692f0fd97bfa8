"""Multi-process training through launch/local_multiprocess.sh, and the cluster launchers."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from conftest import ROOT
from test_train import run_cli

from resfuse_jax.inference.predictor import Predictor

# SGD: Adam would normalise float noise on zero-gradient parameters into lr-sized differences.
ARGS = [
  "--config.train.steps=3",
  "--config.train.optimizer=sgd",
  "--config.train.log_every=1",
  "--config.checkpoint.every_steps=1",
]
CHECKSUM = re.compile(r"process (\d)/(\d): final parameter checksum (\S+)")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("multiprocess") / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
  cmd = [
    "bash",
    "launch/local_multiprocess.sh",
    "2",
    "--config=configs/phantom.py:resfuse,smoke",
    f"--workdir={workdir}",
    *ARGS,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  logs = {p: (workdir / "logs" / f"process_{p}.log").read_text() for p in (0, 1)}
  assert proc.returncode == 0, proc.stderr + logs[0][-3000:] + logs[1][-3000:]
  return workdir, logs


def test_two_processes_hold_the_parameters_of_one_process_on_the_same_global_batch(
  two_processes, tmp_path
):
  workdir, logs = two_processes
  sums = {}
  for p, log in logs.items():
    ((index, count, value),) = CHECKSUM.findall(log)
    assert (int(index), int(count)) == (p, 2)
    sums[p] = float(value)
  assert sums[0] == sums[1]  # the replicas agree bit for bit

  single = run_cli(tmp_path / "single", *ARGS)
  ((_, count, value),) = CHECKSUM.findall(single.stderr)
  assert count == "1" and float(value) == pytest.approx(sums[0], rel=1e-7)
  losses = [re.findall(r"step \d/3 \| loss (\S+)", text) for text in (logs[0], single.stderr)]
  assert losses[0] == losses[1] and len(losses[0]) == 3
  # The multi-host Orbax checkpoint restores in one process, equal to the one-process run's.
  multi, one = Predictor.load(workdir), Predictor.load(tmp_path / "single")
  assert multi.step == one.step == 3
  for a, b in zip(jax.tree.leaves(multi.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_only_process_zero_writes_results_and_event_files(two_processes):
  workdir, logs = two_processes
  assert (workdir / "results.json").is_file() and (workdir / "metrics.csv").is_file()
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
  assert "Validation Dice over 2 cases" in logs[0] and "Validation Dice" not in logs[1]


@pytest.mark.parametrize("script", ["local_multiprocess.sh", "multihost.sh", "slurm.sbatch"])
def test_shell_launchers_parse_and_call_the_main_module(script):
  path = ROOT / "launch" / script
  subprocess.run(["bash", "-n", str(path)], check=True)
  assert "-m resfuse_jax.main" in path.read_text()


def test_multihost_launcher_names_the_missing_variable():
  env = {k: v for k, v in os.environ.items() if k not in ("COORDINATOR_ADDRESS", "PROCESS_ID")}
  env["NUM_PROCESSES"] = "2"
  proc = subprocess.run(
    ["bash", "launch/multihost.sh"], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert proc.returncode != 0 and "COORDINATOR_ADDRESS" in proc.stderr


def test_main_refuses_a_partial_multiprocess_setup(tmp_path):
  proc = run_cli(tmp_path / "w", "--coordinator_address=127.0.0.1:1", check=False)
  assert proc.returncode != 0 and "JAX_NUM_PROCESSES" in proc.stderr


def test_k8s_jobset_is_an_indexed_jobset_running_the_main_module():
  spec = yaml.safe_load((ROOT / "launch" / "k8s-jobset.yaml").read_text())
  assert spec["kind"] == "JobSet"
  job = spec["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
  container = job["template"]["spec"]["containers"][0]
  assert container["command"] == ["python", "-m", "resfuse_jax.main"]
  args = container["args"]
  assert "--process_id=$(JOB_COMPLETION_INDEX)" in args
  assert f"--num_processes={job['completions']}" in args


PACKED = re.compile(
  r"process (\d) packed (\d+) of the (\d+) training cases \(its devices' shards\): (.*)"
)


def test_sharded_resident_data_two_processes_each_load_their_own_cases(tmp_path):
  """Two processes, the training set dealt over their two devices: each packs only its
  own shard's cases (together all of them, none twice), and the run is the one-process
  run on two devices with the same shards, checksum for checksum."""
  flags = [
    *ARGS,
    "--config.data.resident=device",
    "--config.data.resident_layout=sharded",
    "--config.checkpoint.every_steps=3",
  ]
  workdir = tmp_path / "mp"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
  cmd = ["bash", "launch/local_multiprocess.sh", "2", "--config=configs/phantom.py:resfuse,smoke"]
  proc = subprocess.run(
    [*cmd, f"--workdir={workdir}", *flags],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  logs = {p: (workdir / "logs" / f"process_{p}.log").read_text() for p in (0, 1)}
  assert proc.returncode == 0, proc.stderr + logs[0][-3000:] + logs[1][-3000:]
  held = {}
  for p, log in logs.items():
    ((index, count, total, ids),) = PACKED.findall(log)
    assert int(index) == p and len(ids.split()) == int(count)
    held[p] = set(ids.split())
  train_ids = set(json.loads((workdir / "splits.json").read_text())["train"])
  assert int(total) == len(train_ids) and not held[0] & held[1]
  assert held[0] | held[1] == train_ids
  sums = [float(CHECKSUM.findall(logs[p])[0][2]) for p in (0, 1)]
  assert sums[0] == sums[1]

  single = run_cli(tmp_path / "single", *flags, devices=2)
  ((index, count, total, ids),) = PACKED.findall(single.stderr)
  assert set(ids.split()) == train_ids  # one process holds both devices' shards
  ((_, _, value),) = CHECKSUM.findall(single.stderr)
  assert float(value) == pytest.approx(sums[0], rel=1e-6)


FAKE_SRUN = """#!/usr/bin/env bash
{ printf '%s\\n' "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-} RESFUSE_CACHE=${RESFUSE_CACHE:-}"
  printf '%s\\n' "$*"; } >> "$SRUN_LOG"
"""


def sbatch_with_a_fake_srun(tmp_path, **env_vars) -> list[str]:
  """Runs launch/slurm.sbatch as SLURM would, with an ``srun`` that records its calls."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  log = tmp_path / "srun.log"
  env = {k: v for k, v in os.environ.items() if k not in ("RESFUSE_CACHE", "PYTHON")}
  env |= {
    "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(log), "SLURM_JOB_ID": "7",
    "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_CPUS_PER_TASK": "16",
    "SLURM_SUBMIT_DIR": str(tmp_path), **env_vars,
  }  # fmt: skip
  args = ["--config=brats", "--workdir=/shared/runs/brats"]
  proc = subprocess.run(
    ["bash", str(ROOT / "launch" / "slurm.sbatch"), *args],
    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  return log.read_text().splitlines()


def test_slurm_bare_metal_runs_one_process_per_node_on_all_of_its_gpus(tmp_path):
  lines = sbatch_with_a_fake_srun(tmp_path)
  args = "--config=brats --workdir=/shared/runs/brats"
  env = "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 RESFUSE_CACHE="  # not only GPU SLURM_LOCALID
  assert lines == [
    env, f"--ntasks=1 --nodes=1 python -m resfuse_jax.preprocess {args}",
    env, f"python -m resfuse_jax.main --distributed {args}",
  ]  # fmt: skip


def test_slurm_container_form_runs_the_image_with_one_task_per_gpu(tmp_path):
  image = "ghcr.io#your-org/resfuse-jax:0.1.0"
  lines = sbatch_with_a_fake_srun(tmp_path, CONTAINER_IMAGE=image, CONTAINER_MOUNTS="/shared")
  container = (
    f"--container-image={image} --container-mounts={tmp_path}:{tmp_path},/shared "
    f"--container-workdir={tmp_path}"
  )
  args = "--config=brats --workdir=/shared/runs/brats"
  env = f"JAX_LOCAL_DEVICE_IDS= RESFUSE_CACHE={tmp_path}/.cache/resfuse_jax"  # on the mount
  assert lines == [
    env, f"--ntasks=1 --nodes=1 {container} python -m resfuse_jax.preprocess {args}",
    # Every task sees the node's 8 GPUs (JAX picks GPU SLURM_LOCALID): no --gpus-per-task.
    env, f"--ntasks-per-node=8 --cpus-per-task=2 {container} python -m resfuse_jax.main "
    f"--distributed {args}",
  ]  # fmt: skip
