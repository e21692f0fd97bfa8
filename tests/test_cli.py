"""The command-line modules: importable together, and one-line errors for user mistakes."""

import importlib
import subprocess
import sys

import pytest
from absl import flags
from conftest import ROOT

from resfuse_jax import errors

CLIS = ["main", "preprocess", "plan", "predict", "evaluate", "compare", "export"]
OUR_FLAGS = {"config", "workdir", "models", "seeds", "output", "pre", "post", "model", "tta"}


def test_every_cli_module_imports_alongside_the_others_without_defining_flags():
  modules = [importlib.import_module(f"resfuse_jax.{name}") for name in CLIS]
  assert not OUR_FLAGS & set(flags.FLAGS)  # defined by run(), not by import
  for module in modules:
    assert callable(module.run) and callable(module.define_flags)


def test_user_errors_share_one_base_and_keep_value_error():
  for cls in (errors.DataError, errors.ConfigError, errors.CheckpointError):
    assert issubclass(cls, errors.UserError) and issubclass(cls, ValueError)
  assert not issubclass(errors.Preempted, errors.UserError)


def run(*args):
  proc = subprocess.run(
    [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  return proc.returncode, proc.stderr


@pytest.mark.parametrize(
  "args, message",
  [
    # ConfigError: a name no registry knows, before any data is read
    (
      [
        "resfuse_jax.main",
        "--config=configs/phantom.py:smoke",
        "--workdir={tmp}/w",
        "--config.data.name=mri9000",
      ],
      "config.data.name='mri9000': unknown; choose from brats, breast, manifest, phantom",
    ),
    # ConfigError from deep inside training: a mesh the machine cannot hold
    (
      [
        "resfuse_jax.main",
        "--config=configs/phantom.py:smoke",
        "--workdir={tmp}/w",
        "--config.mesh.data=3",
      ],
      "mesh.data=3 x mesh.spatial=1 does not fit 1 devices",
    ),
    # neither a file nor a shipped config's name: refused while parsing the flag
    (
      ["resfuse_jax.main", "--config=nosuch", "--workdir={tmp}/w"],
      "config 'nosuch' not found: no such file, and no shipped config of that name "
      "(brats, breast, manifest, phantom)",
    ),
    # CheckpointError: a workdir that was never trained
    (["resfuse_jax.evaluate", "--workdir={tmp}/nothing"], "is neither a training workdir"),
    (
      ["resfuse_jax.predict", "--workdir={tmp}", "--pre=a", "--post=b", "--out=c.nii.gz"],
      "is neither a training workdir",
    ),
  ],
)
def test_user_errors_are_one_line_and_exit_1(args, message, tmp_path):
  code, stderr = run(*(a.format(tmp=tmp_path) for a in args))
  assert code == 1 and message in stderr
  assert "Traceback" not in stderr
  assert stderr.count(message) == 1  # said once: no log line repeating the error line
  lines = stderr.strip().splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
  assert message in "\n".join(lines[first:])  # the error block is last: a line per problem


FLAG_PROBE = """
import sys
from absl import flags
from ml_collections import config_flags
from resfuse_jax import cli
cli.define_config_flag("probe")
flags.FLAGS(sys.argv)
flag = flags.FLAGS["config"]
print(flags.FLAGS.config.model.name, flags.FLAGS.config.train.steps)
print(config_flags.get_config_filename(flag))
print(config_flags.get_override_values(flag))
flags.FLAGS.config.train.steps = 5  # locked: existing keys stay settable
try:
  flags.FLAGS.config.train.nonsense = 1
except AttributeError:
  print("locked")
"""


def test_the_config_flag_takes_a_shipped_name_from_any_folder(tmp_path):
  """The name resolves before ml_collections loads it; the overrides, the spec as typed (what
  compare passes on to config_lib.load) and the lock are ml_collections' own."""
  spec = "phantom:resunet,smoke"
  argv = [f"--config={spec}", "--config.train.steps=3"]
  proc = subprocess.run(
    [sys.executable, "-c", FLAG_PROBE, *argv],
    cwd=tmp_path, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines() == ["resunet 3", spec, "{'train.steps': 3}", "locked"]
