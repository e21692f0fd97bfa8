"""Shared fixtures: a small phantom on disk, tiny configs, absl flags parsed for Grain."""

import os
from pathlib import Path

import pytest
from absl import flags

ROOT = Path(__file__).resolve().parents[1]
flags.FLAGS.mark_as_parsed()  # Grain reads absl flags


def _process_defaults():
  """What every command sets (cli.prepare_process), so in-process programs are the CLIs'."""
  from resfuse_jax import backend

  backend.apply_rng_default()


_process_defaults()


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
  os.environ["RESFUSE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One XLA compilation cache for the session, this process and every CLI it starts.

  Most end-to-end tests run the same smoke programs (a tiny model's step, its
  validation windows); compiled once, each later process loads them. Correctness is
  unaffected: the cache key is the program's fingerprint.
  """
  import jax

  folder = str(tmp_path_factory.mktemp("xla_cache"))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory):
  """8 cases of 32^3, written once per session in the BraTS layout."""
  from resfuse_jax.data import phantom

  spec = phantom.PhantomSpec(num_cases=8, shape=(32, 32, 32), seed=3)
  root = tmp_path_factory.mktemp("phantom")
  phantom.write_phantom(root, spec)
  return root, spec


@pytest.fixture(scope="session")
def small_cases(small_phantom):
  from resfuse_jax import data
  from resfuse_jax.data import brats

  root, _ = small_phantom
  return data.read_cases(brats.find_cases(root), data.get_dataset("phantom"))


def smoke_config(model="resfuse", **overrides):
  """configs/phantom.py:<model>,smoke with ``{'train.steps': 2, ...}`` overrides."""
  from resfuse_jax import config_lib

  return config_lib.load(f"{ROOT / 'configs' / 'phantom.py'}:{model},smoke", overrides)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A 2-step smoke run of the real CLI, shared by the predict and export tests (read-only)."""
  from test_train import run_cli

  workdir = tmp_path_factory.mktemp("trained") / "run"
  run_cli(workdir, "--config.train.steps=2")
  return workdir


@pytest.fixture(scope="session")
def cross_validation_workdir(tmp_path_factory):
  """A 2-fold, 2-step smoke cross-validation by the real CLI (main --folds=all), read-only."""
  from test_train import run_cli

  workdir = tmp_path_factory.mktemp("cross_validation") / "cv"
  proc = run_cli(workdir, *CROSS_VALIDATION_ARGS)
  return workdir, proc


CROSS_VALIDATION_ARGS = ("--config.data.num_folds=2", "--folds=all", "--config.train.steps=2")
