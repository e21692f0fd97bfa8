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


def test_the_gpu_column_is_cudnns_3d_conv_in_bfloat16():
  assert backend.platform("cuda") == "gpu" and backend.platform("cpu") == "cpu"
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
