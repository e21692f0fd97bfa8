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
