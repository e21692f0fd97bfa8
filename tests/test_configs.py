import brats as brats_config  # configs/brats.py
import breast as breast_config  # configs/breast.py
import common  # configs/common.py
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


DATASETS = [phantom_config, brats_config, breast_config, manifest_config]


@pytest.mark.parametrize("module", DATASETS)
@pytest.mark.parametrize("arg", [None, *common.MODELS, "resunet,smoke", "a2fnet,smoke", "smoke"])
def test_configs_load_with_the_contract_keys(module, arg):
  c = module.get_config(arg)
  for key in REQUIRED:
    get(c, key)
  variant = (arg or "resfuse").split(",")[0]
  variant = "resfuse" if variant == "smoke" else variant
  assert c.model.variant == variant
  assert c.model.name == common.VARIANTS[variant][0]
  assert c.model.name in models.names()
  levels = len(c.model.features)
  assert all(p % 2 ** (levels - 1) == 0 for p in c.data.patch_size)


def test_every_registered_model_has_a_config():
  assert set(models.names()) <= set(common.MODELS)


@pytest.mark.parametrize("module", DATASETS)
@pytest.mark.parametrize("options", ["", ",smoke"])
def test_model_configs_differ_in_the_model_only(module, options):
  """A comparison changes one thing: data, training, evaluation and seed are shared."""
  reference = module.get_config(f"resfuse{options}").to_dict()
  for variant in common.MODELS:
    c = module.get_config(f"{variant}{options}").to_dict()
    assert {k: v for k, v in c.items() if k != "model"} == {
      k: v for k, v in reference.items() if k != "model"
    }
    assert c["model"]["features"] == reference["model"]["features"]


def test_unknown_config_arg_is_an_error():
  with pytest.raises(ValueError, match="Unknown config args"):
    phantom_config.get_config("resfuse,fast")


def test_datasets_differ_only_in_data_and_size():
  p, b = phantom_config.get_config("resfuse"), brats_config.get_config("resfuse")
  assert p.model.fusion == b.model.fusion and p.train.optimizer == b.train.optimizer
  assert p.data.name == "phantom" and b.data.name == "brats"
