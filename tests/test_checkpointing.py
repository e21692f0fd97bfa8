"""Names say what they restore: the whole train state for resuming, the parameters alone
for inference."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resfuse_jax import checkpointing
from resfuse_jax.errors import CheckpointError
from resfuse_jax.workdir import read_config


@pytest.fixture
def saved(tmp_path):
  state = {
    "step": jnp.asarray(3, jnp.int32),
    "params": {"conv": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "bias": jnp.ones(3)},
    "opt_state": {"mu": jnp.full((2, 3), 7.0)},
  }
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(it)
  manager = checkpointing.make_manager(tmp_path / "checkpoints", keep=2)
  checkpointing.save(manager, 3, state, it)
  manager.wait_until_finished()
  manager.close()
  return tmp_path / "checkpoints", state


def test_restore_params_reads_the_parameters_alone(saved):
  directory, state = saved
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])
  params, step = checkpointing.restore_params(directory, None, abstract)
  assert step == 3 and set(params) == {"conv", "bias"}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_params_names_what_is_missing(saved, tmp_path):
  directory, state = saved
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])
  with pytest.raises(CheckpointError, match=r"no checkpoint of step 5 .* it has \[3\]"):
    checkpointing.restore_params(directory, 5, abstract)
  with pytest.raises(CheckpointError, match="no finished checkpoint"):
    checkpointing.restore_params(tmp_path / "empty", None, abstract)
  assert not (tmp_path / "empty").exists()  # looking creates nothing


def test_restore_train_state_gives_everything_back(saved):
  directory, state = saved
  manager = checkpointing.make_manager(directory, keep=2)
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored = checkpointing.restore_train_state(manager, 3, abstract, it)
  manager.close()
  assert int(restored["step"]) == 3
  np.testing.assert_array_equal(np.asarray(restored["opt_state"]["mu"]), 7.0)
  assert next(it) == 1  # the iterator resumes after the element consumed before the save


def test_read_config_says_what_the_folder_lacks(tmp_path):
  with pytest.raises(CheckpointError, match="neither a training workdir nor an export"):
    read_config(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    read_config(tmp_path)
