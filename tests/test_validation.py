"""Reliability 3, class 4: the resolved config is validated once, up front, by every command.

Each bad setting is planted and must come back as one line naming the key, the value and
what is allowed; the CLI tests check that nothing is written and no traceback is printed.
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, smoke_config

from resfuse_jax import validation, workdir
from resfuse_jax.errors import ConfigError


def test_the_shipped_configs_are_valid():
  from resfuse_jax import config_lib

  for name in ("phantom", "brats", "breast", "manifest"):
    for arg in ("resfuse", "resunet,smoke", "lits"):
      assert validation.problems(config_lib.load(f"{ROOT}/configs/{name}.py:{arg}")) == []


@pytest.mark.parametrize(
  "overrides, line",
  [
    ({"train.log_every": 0}, "config.train.log_every=0: must be an integer >= 1"),
    ({"eval.every_steps": 0}, "config.eval.every_steps=0: must be an integer >= 1"),
    ({"checkpoint.every_steps": 0}, "config.checkpoint.every_steps=0: must be an integer >= 1"),
    ({"train.steps": 0}, "config.train.steps=0: must be an integer >= 1"),
    ({"train.steps": -5}, "config.train.steps=-5: must be an integer >= 1"),
    ({"train.batch_size": 0}, "config.train.batch_size=0: must be an integer >= 1"),
    (
      {"train.batch_size": 4, "train.grad_accum": 3},
      "config.train.grad_accum=3: must divide config.train.batch_size=4",
    ),
    ({"data.patch_size": (16, 16)}, "config.data.patch_size=(16, 16): must be 3 positive"),
    ({"data.patch_size": (16, 0, 16)}, "config.data.patch_size=(16, 0, 16): must be 3 positive"),
    (
      {"data.target_spacing": (1.0, 0.0, 1.0)},
      "config.data.target_spacing=(1.0, 0.0, 1.0): must be None",
    ),
    ({"data.target_spacing": (1.0, -1.0, 1.0)}, "config.data.target_spacing=(1.0, -1.0, 1.0)"),
    ({"eval.thresholds": (0.5, 0.5)}, "config.eval.thresholds=(0.5, 0.5): 2 value(s) for 3"),
    ({"eval.thresholds": (1.5,)}, "config.eval.thresholds=(1.5,): must be numbers in (0, 1)"),
    ({"data.name": "mri9000"}, "config.data.name='mri9000': unknown; choose from brats"),
    ({"model.name": "resfusee"}, "config.model.name='resfusee': unknown (did you mean 'resfuse'?)"),
    ({"data.fold": 5}, "config.data.fold=5: must be 0 .. 4"),
    ({"eval.overlap": 1.0}, "config.eval.overlap=1.0: must be a number in [0, 1)"),
    ({"train.optimizer": "adam"}, "config.train.optimizer='adam': unknown"),
  ],
)
def test_each_bad_setting_is_one_line_naming_key_value_and_what_is_allowed(overrides, line):
  problems = validation.problems(smoke_config(**overrides))
  assert len(problems) == 1 and problems[0].startswith(line), problems
  with pytest.raises(ConfigError, match=r"1 invalid setting"):
    validation.check(smoke_config(**overrides))


def test_the_model_names_it_knows_are_the_registrys():
  from resfuse_jax import models

  assert validation.MODEL_NAMES == models.names()


def test_every_problem_is_listed_at_once():
  config = smoke_config(**{"train.log_every": 0, "train.steps": 0, "data.patch_size": (8, 8)})
  assert len(validation.problems(config)) == 3


def test_a_misspelled_key_names_the_nearest_valid_one():
  config = smoke_config()
  assert "did you mean --config.train.steps?" in validation.unknown_key(config, "train.stpes")
  assert "did you mean --config.train.steps?" in validation.unknown_key(config, "trian.steps")
  assert "did you mean" not in validation.unknown_key(config, "zzz.qqq")


def test_a_config_json_with_a_bad_setting_is_refused_on_read(tmp_path):
  """evaluate, predict and export read W/config.json through workdir.read_config."""
  config = smoke_config().to_dict()
  config["eval"]["every_steps"] = 0
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=r"config\.json.*\n.*config.eval.every_steps=0"):
    workdir.read_config(tmp_path)


def cli(*args, cwd=ROOT):
  proc = subprocess.run(
    [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300
  )
  return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.train.log_every=0"], "config.train.log_every=0: must be an integer >= 1"),
    (["--config.train.stpes=5"], "--config.train.stpes: no such config key; did you mean "),
  ],
)
def test_main_refuses_before_anything_is_written(args, message, tmp_path):
  w = tmp_path / "w"
  code, _, stderr = cli(
    "resfuse_jax.main", "--config=configs/phantom.py:smoke", f"--workdir={w}", *args
  )
  assert code == 1 and message in stderr and "Traceback" not in stderr, stderr
  assert list(tmp_path.iterdir()) == []  # not even W


def test_an_unknown_model_in_the_config_arg_is_one_line(tmp_path):
  code, _, stderr = cli("resfuse_jax.preprocess", "--config=configs/phantom.py:resfusee,smoke")
  assert code == 1 and "Traceback" not in stderr, stderr
  (line,) = [line for line in stderr.splitlines() if "resfusee" in line]
  assert line.startswith("error: Unknown config args ['resfusee'] (did you mean 'resfuse'?)")


def test_compare_and_sweep_check_every_run_before_the_first(tmp_path):
  from resfuse_jax import comparison

  spec = f"{ROOT}/configs/phantom.py:smoke"
  with pytest.raises(ConfigError, match=r"--sweep train.log_every=0.*\n.*log_every=0: must be"):
    comparison.sweep(spec, ["resfuse"], tmp_path / "s", "train.log_every=1,0")
  with pytest.raises(ConfigError, match=r"--models=resunet.*\n.*grad_accum=3: must divide"):
    comparison.compare(spec, ["resunet"], tmp_path / "c", {"train.grad_accum": 3})
  assert list(tmp_path.iterdir()) == []


def fake_case(case_id, shape):
  import numpy as np

  from resfuse_jax.data import Case

  vol = np.zeros(shape, np.float32)
  return Case(case_id, vol, vol, None, (1.0, 1.0, 1.0), np.eye(4), shape, ((0, 0),) * 3, (1, 1, 1))


def test_a_patch_longer_than_every_case_on_an_axis_is_refused_naming_the_case():
  from resfuse_jax.data.fingerprint import Fingerprint

  fingerprint = Fingerprint.of_cases([fake_case("a", (40, 20, 30)), fake_case("b", (30, 24, 50))])
  assert fingerprint.largest_extent() == ((40, "a"), (24, "b"), (50, "b"))
  validation.check_against(smoke_config(**{"data.patch_size": (40, 24, 48)}), fingerprint)
  config = smoke_config(**{"data.patch_size": (48, 24, 48)})
  with pytest.raises(ConfigError) as error:
    validation.check_against(config, fingerprint)
  message = str(error.value)
  assert "config.data.patch_size=(48, 24, 48)" in message and "\n" not in message
  assert (
    "axis 0 (x, right-left) is 48 voxels, but the longest of the 2 cases there is 40 (case a)"
    in message
    and "at most (40, 24, 48)" in message
  )


def test_main_refuses_a_patch_the_data_cannot_hold_before_the_splits(small_phantom, tmp_path):
  w = tmp_path / "w"
  code, _, stderr = cli(
    "resfuse_jax.main",
    "--config=configs/brats.py:resfuse,smoke",
    f"--workdir={w}",
    f"--config.data.root={small_phantom[0]}",
    "--config.data.patch_size=(64,16,16)",
  )
  assert code == 1 and "Traceback" not in stderr, stderr
  (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert "config.data.patch_size=(64, 16, 16) does not fit the data" in line and "axis 0" in line
  assert sorted(p.name for p in w.iterdir()) == [".lock", "config.json"]  # no splits, no steps
