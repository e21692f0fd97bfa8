import brats as brats_config  # configs/brats.py
import breast as breast_config  # configs/breast.py
import manifest as manifest_config  # configs/manifest.py
import phantom as phantom_config  # configs/phantom.py
import pytest

from resfuse_jax import models

REQUIRED = [
  "seed",
  "model.name",
  "model.features",
  "model.fusion",
  "data.name",
  "data.root",
  "data.patch_size",
  "data.fold",
  "train.steps",
  "train.batch_size",
  "train.lr",
  "eval.every_steps",
  "checkpoint.every_steps",
  "mesh.data",
]


def get(c, dotted):
  for part in dotted.split("."):
    c = c[part]
  return c


@pytest.mark.parametrize("module", [phantom_config, brats_config, breast_config, manifest_config])
@pytest.mark.parametrize(
  "arg", [None, "resfuse", "resunet", "resunet_early", "resunet,smoke", "smoke"]
)
def test_configs_load_with_the_contract_keys(module, arg):
  c = module.get_config(arg)
  for key in REQUIRED:
    get(c, key)
  expected = (arg or "resfuse").split(",")[0]
  assert c.model.name == (expected if expected != "smoke" else "resfuse")
  assert c.model.name in models.names()
  levels = len(c.model.features)
  assert all(p % 2 ** (levels - 1) == 0 for p in c.data.patch_size)


def test_unknown_config_arg_is_an_error():
  with pytest.raises(ValueError, match="Unknown config args"):
    phantom_config.get_config("resfuse,fast")


def test_datasets_differ_only_in_data_and_size():
  p, b = phantom_config.get_config("resfuse"), brats_config.get_config("resfuse")
  assert p.model.fusion == b.model.fusion and p.train.optimizer == b.train.optimizer
  assert p.data.name == "phantom" and b.data.name == "brats"
