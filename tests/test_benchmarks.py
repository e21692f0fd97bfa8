"""The PyTorch reference of benchmarks/ is the same architecture as ours: what makes timing fair."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_reference  # noqa: E402

from resfuse_jax import models, train  # noqa: E402


@pytest.mark.parametrize("name", ["resfuse", "resunet"])
@pytest.mark.parametrize("features", [(4, 8), (16, 32, 64, 128, 256)])
def test_torch_reference_has_our_parameter_count_and_output_shape(name, features):
  cfg = ml_collections.ConfigDict({"name": name, "features": features})
  model = models.build(cfg, 3)
  x = jnp.zeros((1, 16, 16, 16, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]
  ref = torch_reference.build(name, features, 3)
  assert torch_reference.count_params(ref) == train.count_params(params)
  if len(features) == 2:
    t = torch.zeros(1, 1, 16, 16, 16)
    assert tuple(ref(t, t).shape) == (1, 3, 16, 16, 16)


def test_torch_reference_train_step_lowers_the_loss():
  torch.manual_seed(0)
  model = torch_reference.build("resfuse", (4, 8), 3)
  step = torch_reference.make_train_step(model, ((1, 2, 3), (1, 3), (3,)), lr=1e-2)
  post = torch.randn(2, 1, 16, 16, 16)
  label = (post[:, 0] > 1.0).long() * 3
  losses = [float(step(post * 0.5, post, label)) for _ in range(8)]
  assert losses[-1] < losses[0]


def synthetic_results(torch_params=100):
  import suite

  def row(framework, model, step_s, impl=None, **extra):
    r = {"framework": framework, "model_name": model, "patch": 8, "batch": 2, "params": 100}
    r.update(step_times_s=[step_s, step_s], peak_rss_mb=1000.0, **extra)
    if impl:
      r["conv_impl"] = impl
    return suite.step_row(r)

  rows = [
    row("jax", "resfuse", 2.0, "auto", flops=4e9),
    row("jax", "resfuse", 6.0, "xla", flops=4e9),
    row("torch", "resfuse", 1.0),
    row("jax", "resunet", 1.6, "auto", flops=3e9),
    {**row("torch", "resunet", 0.8), "params": torch_params},
  ]
  return {
    "name": "t",
    "device": "cpu",
    "cpu_count": 2,
    "versions": {"jax": "x", "torch": "y"},
    "command": "c",
    "date": "d",
    "matmul_flops_per_s": 4e9,
    "train_step": rows,
    "scaling": [],
    "inference": [
      {"framework": "jax", "volume_s": 10.0, "warmup_s": 1.0, "peak_rss_mb": 1.0},
      {"framework": "monai", "volume_s": 15.0, "warmup_s": 1.0, "peak_rss_mb": 1.0},
    ],
    "pipeline": {"patches_per_s_0_workers": 3.0, "patches_per_s_2_workers": 1.0},
  }


def test_suite_ratios_are_the_issues_targets():
  import suite

  r = suite.ratios(synthetic_results())
  assert r["resfuse_torch_over_jax_step"] == pytest.approx(0.5)
  assert r["resfuse_over_resunet_step_jax"] == pytest.approx(2.0 / 1.6)
  assert r["monai_over_jax_inference"] == pytest.approx(1.5)
  assert r["resfuse_flops_fraction_of_matmul"] == pytest.approx(0.5)  # 4e9 / 2 s / 4e9
  assert r["pipeline_over_step_consumption"] == pytest.approx(3.0 / (2 / 2.0))
  assert r["resfuse_xla_conv_over_auto_step"] == pytest.approx(3.0)
  table = suite.markdown({**synthetic_results(), "ratios": r})
  assert "| resfuse | jax | xla | 8³ | 2 | 100 | 6.00 |" in table


def test_suite_refuses_to_compare_models_of_different_size():
  import suite

  with pytest.raises(AssertionError, match="resunet: 100 parameters in JAX, 99 in torch"):
    suite.ratios(synthetic_results(torch_params=99))
