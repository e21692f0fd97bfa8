"""Per-backend defaults: `auto` resolves per backend, bad values name the field, the layout flag."""

import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import pytest
from conftest import ROOT

from resfuse_jax import backend, config_lib, models
from resfuse_jax.errors import ConfigError
from resfuse_jax.models import convolution


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_auto_takes_the_backends_column(platform):
  defaults = backend.DEFAULTS[platform]
  for field in backend.CHOICES:
    assert backend.resolve(field, "auto", platform) == defaults[field]
    assert defaults[field] in backend.CHOICES[field]
  assert backend.resolve("eval_batch_size", 0, platform) == defaults["eval_batch_size"]
  assert backend.resolve("eval_batch_size", 3, platform) == 3


def test_the_gpu_column_is_what_the_h200_measured():
  """cuDNN's 3D conv with the two rewrites, bf16, NHWC (40.5 vs 50.0 ms), device tiling at
  4 windows per call (168 vs 1,141-1,400 ms host-tiled): benchmarks/results/gpu.md."""
  assert backend.platform("cuda") == "gpu" and backend.platform("cpu") == "cpu"
  gpu = backend.DEFAULTS["gpu"]
  assert (gpu["conv_layout"], gpu["tiling"], gpu["eval_batch_size"]) == ("nhwc", "device", 4)
  plan = convolution.resolve_conv_plan(config_lib.base_config("resfuse").model, "cuda")
  assert plan == convolution.ConvPlan("xla", "space_to_depth", "depth_to_space")
  assert models.compute_dtype(config_lib.base_config("resfuse").train, "cuda") == jnp.bfloat16
  assert models.compute_dtype(config_lib.base_config("resfuse").train, "cpu") == jnp.float32
  explicit = ml_collections.ConfigDict({"compute_dtype": "float32"})
  assert models.compute_dtype(explicit, "cuda") == jnp.float32


def test_bad_values_name_the_field_and_the_choices():
  with pytest.raises(ConfigError, match="train.compute_dtype must be one of auto, float32, bf"):
    models.compute_dtype(ml_collections.ConfigDict({"compute_dtype": "float16"}))
  with pytest.raises(ConfigError, match="eval_batch_size must be > 0"):
    backend.resolve("eval_batch_size", -1)
  with pytest.raises(ConfigError, match="model.conv_layout must be one of auto, default, nhwc"):
    backend.apply_conv_layout("nwhc")


def test_the_conv_layout_flag_is_set_before_jax_starts_and_refused_after():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  script = (
    "import os; from resfuse_jax import backend; backend.apply_conv_layout('nhwc'); "
    "import jax; jax.devices(); print(os.environ['XLA_FLAGS'])"
  )
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "--xla_gpu_force_conv_nhwc=true"  # and XLA accepted it
  late = (
    "import jax; jax.devices(); from resfuse_jax import backend; backend.apply_conv_layout('nchw')"
  )
  out = subprocess.run(
    [sys.executable, "-c", late], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode != 0 and "must be set before JAX starts" in out.stderr
  assert "XLA_FLAGS=--xla_gpu_force_conv_nchw=true" in out.stderr


def test_default_and_auto_leave_xla_flags_alone(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
  backend.apply_conv_layout("auto")  # JAX has started in this process: no flag, no error
  backend.apply_conv_layout("default")
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/nowhere"


def run_python(script, **env):
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **env}
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip()


def test_auto_sets_the_gpu_columns_layout_only_where_a_gpu_may_start():
  script = (
    "import os; from resfuse_jax import backend; backend.gpu_may_start = lambda: {may}; "
    "backend.apply_conv_layout('auto'); import jax; jax.devices(); "
    "print(os.environ.get('XLA_FLAGS', ''))"
  )
  assert run_python(script.format(may=True)) == "--xla_gpu_force_conv_nhwc=true"
  assert run_python(script.format(may=False)) == ""  # a CPU install: its cache keys unchanged
  # a layout the user set is kept by auto, and removed by an explicit default
  user = {"XLA_FLAGS": "--xla_gpu_force_conv_nchw=true --xla_dump_hlo_pass_re=none"}
  assert run_python(script.format(may=True), **user) == user["XLA_FLAGS"]
  default = (
    "import os; from resfuse_jax import backend; backend.apply_conv_layout('default'); "
    "import jax; jax.devices(); print(os.environ['XLA_FLAGS'])"
  )
  assert run_python(default, **user) == "--xla_dump_hlo_pass_re=none"


def test_a_gpu_may_start_where_a_cuda_plugin_is_installed_and_not_ruled_out(monkeypatch):
  import importlib.metadata

  class Plugin:
    name = "xla_cuda13"

  real = importlib.metadata.entry_points
  fake = lambda group=None, **kw: [Plugin()] if group == "jax_plugins" else real(group=group, **kw)  # noqa: E731
  monkeypatch.setattr(importlib.metadata, "entry_points", fake)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert backend.gpu_may_start()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not backend.gpu_may_start()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert backend.gpu_may_start()
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None, **kw: [])
  assert not backend.gpu_may_start()


def test_the_threefry_flavour_follows_the_platform_unless_the_user_set_it(monkeypatch):
  import jax

  before = jax.config.jax_threefry_partitionable
  try:
    monkeypatch.delenv("JAX_THREEFRY_PARTITIONABLE", raising=False)
    for may, expected in ((False, False), (True, True)):
      monkeypatch.setattr(backend, "gpu_may_start", lambda may=may: may)
      assert backend.apply_rng_default() is expected
      assert jax.config.jax_threefry_partitionable is expected
    monkeypatch.setenv("JAX_THREEFRY_PARTITIONABLE", "1")  # the user's own choice stays
    jax.config.update("jax_threefry_partitionable", True)
    monkeypatch.setattr(backend, "gpu_may_start", lambda: False)
    assert backend.apply_rng_default() is True and jax.config.jax_threefry_partitionable
  finally:
    jax.config.update("jax_threefry_partitionable", before)


def test_the_compilation_cache_folder_is_the_flag_else_jaxs_else_the_users_cache(
  monkeypatch, tmp_path
):
  import jax

  from resfuse_jax import cli

  assert cli.compilation_cache_folder("off") is None and cli.compilation_cache_folder("OFF") is None
  assert cli.compilation_cache_folder(str(tmp_path / "mine")) == tmp_path / "mine"
  before = jax.config.jax_compilation_cache_dir  # the session's (conftest)
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("RESFUSE_CACHE", str(tmp_path / "user"))
    assert cli.compilation_cache_folder("") == tmp_path / "user" / "xla"
    jax.config.update(
      "jax_compilation_cache_dir", str(tmp_path / "jax")
    )  # JAX_COMPILATION_CACHE_DIR
    assert cli.compilation_cache_folder("") == tmp_path / "jax"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_every_command_compiles_into_the_users_cache_and_a_second_process_loads_it(
  trained_workdir, small_phantom, tmp_path
):
  """predict twice in fresh processes: the first writes XLA's cache under $RESFUSE_CACHE/xla,
  the second compiles nothing (JAX's own counters); --compilation_cache=off writes nothing."""
  root, _ = small_phantom
  case = sorted(p for p in root.iterdir() if p.is_dir())[0]
  drop = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env |= {
    "RESFUSE_CACHE": str(tmp_path / "user"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  script = (
    "import collections, sys, jax; from resfuse_jax import predict; "
    "n = collections.Counter(); jax.monitoring.register_event_listener(lambda e, **k: n.update([e])); "
    "sys.argv = ['predict'] + sys.argv[1:]; "
    "import atexit; atexit.register(lambda: print('HITS', n['/jax/compilation_cache/cache_hits'], "
    "'MISSES', n['/jax/compilation_cache/cache_misses'])); predict.run()"
  )

  def run(out, *flags):
    cmd = [sys.executable, "-c", script, f"--workdir={trained_workdir}", f"--out={out}", *flags]
    cmd += ["--backend=jax"]  # XLA's cache is the subject (auto would run OpenVINO on a CPU)
    cmd += [
      f"--pre={case / f'{case.name}-t1n.nii.gz'}",
      f"--post={case / f'{case.name}-t1c.nii.gz'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits, misses = proc.stdout.split("HITS")[-1].split("MISSES")
    return int(hits), int(misses)

  cache = tmp_path / "user" / "xla"
  off = run(tmp_path / "a.nii.gz", "--compilation_cache=off")
  assert off == (0, 0) and not cache.exists()
  hits, misses = run(tmp_path / "b.nii.gz")
  entries = sorted(p.name for p in cache.iterdir())
  assert misses > 0 and entries
  hits, misses = run(tmp_path / "c.nii.gz")
  assert hits > 0 and misses == 0
  assert sorted(p.name for p in cache.iterdir()) == entries
