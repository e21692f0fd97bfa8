"""task.Task: the one place a config becomes parts (model, dataset, regions, window, settings)."""

import jax
import jax.numpy as jnp
import pytest
from conftest import smoke_config

from resfuse_jax import config_lib, data, models
from resfuse_jax.errors import ConfigError
from resfuse_jax.task import Task, build_model


@pytest.mark.parametrize("variant", config_lib.MODELS)
def test_every_registered_model_gives_a_model_for_the_datasets_regions(variant):
  task = Task.from_config(smoke_config(variant))
  assert task.config.model.variant == variant
  x = jax.ShapeDtypeStruct((1, *task.patch_size, 1), jnp.float32)
  params = jax.eval_shape(lambda t: task.model.init(jax.random.key(0), t, t)["params"], x)
  out = jax.eval_shape(lambda p, t: task.model.apply({"params": p}, t, t), params, x)
  assert out.shape == (1, *task.patch_size, len(task.regions)) == (1, 16, 16, 16, 3)
  assert models.count_params(params) > 0


@pytest.mark.parametrize("name", data.names())
def test_every_registered_dataset_gives_its_regions_and_settings(name):
  config = smoke_config(**{"data.name": name, "data.target_spacing": (1.0, 1.0, 2.0)})
  task = Task.from_config(config)
  assert task.dataset is data.get_dataset(name)
  assert task.region_names == list(task.regions) and len(task.region_values) == len(task.regions)
  assert task.prep_settings.target_spacing == (1.0, 1.0, 2.0)
  assert task.input_limits.max_voxels == config.data.max_voxels


def test_the_window_crop_dtype_and_loss_weight_come_from_the_config():
  plain = Task.from_config(smoke_config(**{"data.augment.preset": "none"}))
  assert plain.augmentation.identity and plain.crop_shape == plain.patch_size == (16, 16, 16)
  rotated = Task.from_config(smoke_config(**{"data.augment.p_rotation": 0.5}))
  assert all(c > p for c, p in zip(rotated.crop_shape, rotated.patch_size))  # rotation margin
  bf16 = Task.from_config(smoke_config(**{"train.compute_dtype": "bfloat16"}))
  assert bf16.compute_dtype == jnp.bfloat16 and bf16.model.dtype == jnp.bfloat16
  assert Task.from_config(smoke_config(**{"train.aux_loss_weight": 0.25})).aux_loss_weight == 0.25
  assert type(build_model(smoke_config("lits"))).__name__ == "LiTS"


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"model.name": "unet9000"}, r"Unknown model.name 'unet9000'; registered models: a2fnet, "),
    ({"data.name": "mri"}, r"Unknown data.name 'mri'; registered datasets: brats, "),
    ({"train.compute_dtype": "float16"}, "train.compute_dtype must be one of"),
    ({"data.augment.preset": "heavy"}, "data.augment.preset must be one of"),
  ],
)
def test_unknown_names_are_one_line_config_errors_listing_the_valid_ones(overrides, message):
  with pytest.raises(ConfigError, match=message):
    Task.from_config(smoke_config(**overrides))
