"""Reliability 3, class 7: what a new user meets, each planted and its outcome asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, smoke_config

from resfuse_jax import checkpointing, data, writers
from resfuse_jax.errors import CheckpointError, DataError
from resfuse_jax.inference import onnx_runtime
from resfuse_jax.train import loop


def cli(*args, env=None):
  proc = subprocess.run(
    [*args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env or os.environ
  )
  return proc.returncode, proc.stdout, proc.stderr


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("command", ["predict", "main"])
def test_help_exits_0_and_lists_the_commands_own_flags(command):
  code, stdout, stderr = cli(sys.executable, "-m", f"resfuse_jax.{command}", "--help")
  assert code == 0, stderr
  assert "--workdir" in stdout and "flags:" in stdout
  assert "--grain_" not in stdout and "--logtostderr" not in stdout  # not every library's flags


def test_the_console_script_help_shows_the_flags():
  """``resfuse-predict --help``: a console script's main module is not the command's."""
  script = Path(sys.executable).parent / "resfuse-predict"
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  if script.is_file():
    code, stdout, stderr = cli(str(script), "--help", env=env)
  else:  # what the script does, for an environment without the console scripts
    run = "import sys; sys.argv[0] = 'resfuse-predict'; from resfuse_jax.predict import run; run()"
    code, stdout, stderr = cli(sys.executable, "-c", run, "--help", env=env)
  assert code == 0, stderr
  for flag in ("--workdir", "--model", "--input", "--output", "--tta"):
    assert flag in stdout


def test_a_missing_flag_is_one_line_naming_it_not_the_whole_help():
  code, stdout, stderr = cli(sys.executable, "-m", "resfuse_jax.main")
  assert code == 1 and "Traceback" not in stderr
  (line,) = error_lines(stderr)
  assert "missing --config, --workdir" in line and "--help" in line
  assert "Trains and evaluates" not in stderr + stdout  # the module's help is not printed


def test_predict_with_workdir_and_model_says_that_is_the_problem(tmp_path):
  code, _, stderr = cli(
    sys.executable, "-m", "resfuse_jax.predict", f"--workdir={tmp_path}", f"--model={tmp_path}",
    "--pre=a.nii.gz", "--post=b.nii.gz", "--out=c.nii.gz",
  )  # fmt: skip
  assert code == 1 and "Traceback" not in stderr
  (line,) = error_lines(stderr)
  assert "--workdir" in line and "--model" in line and "not both" in line


@pytest.mark.parametrize("dataset", ["phantom", "brats", "breast"])
def test_input_in_the_wrong_layout_suggests_predicts_own_flags(dataset, tmp_path):
  (tmp_path / "scans").mkdir()
  (tmp_path / "scans" / "a.nii.gz").write_bytes(b"")
  cfg = smoke_config(**{"data.name": dataset}).data
  for path in (tmp_path / "scans", tmp_path / "scans" / "a.nii.gz"):
    with pytest.raises(DataError) as e:
      data.find_input_cases(path, cfg)
    message = str(e.value)
    assert f"--input={path}" in message and "--pre=" in message and "manifest" in message
    assert "data.root" not in message


def _save(directory, steps):
  params = {"conv": {"kernel": jnp.arange(600.0).reshape(20, 30)}, "bias": jnp.ones(3)}
  it = iter(grain.MapDataset.range(10).to_iter_dataset())
  manager = checkpointing.make_manager(directory, keep=5)
  for step in steps:
    state = {"step": jnp.asarray(step), "params": params, "opt_state": {"mu": jnp.zeros(3)}}
    checkpointing.save(manager, step, state, it)
  manager.wait_until_finished()
  manager.close()
  return {k: v for k, v in params.items()}


def _damage(step_dir: Path):
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:10])


def test_a_damaged_checkpoint_names_the_step_and_suggests_another(tmp_path):
  import jax

  directory = tmp_path / "checkpoints"
  params = _save(directory, [3, 5])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  _damage(directory / "5")
  with pytest.raises(CheckpointError) as e:
    checkpointing.restore_params(directory, None, abstract)
  message = str(e.value)
  assert "checkpoint step 5" in message and "--step=3" in message, message
  assert "\n" not in message and len(message) < 600 and "TensorStore(" not in message
  _, step = checkpointing.restore_params(directory, 3, abstract)  # the suggestion works
  assert step == 3
  _damage(directory / "3")
  with pytest.raises(CheckpointError, match="it is the only checkpoint|--step=5"):
    checkpointing.restore_params(directory, 3, abstract)


def test_without_onnx_export_and_predict_give_the_install_command(tmp_path, monkeypatch):
  from resfuse_jax.inference import predictor
  from resfuse_jax.serving import exporting

  real = exporting.importlib.util.find_spec
  monkeypatch.setattr(
    exporting.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name)
  )
  record = exporting.write_onnx(tmp_path, None, "auto", {})
  assert not record["written"] and "pip install 'resfuse-jax[deploy]'" in record["reason"]
  (tmp_path / "export.json").write_text(json.dumps({"onnx": record}))
  with pytest.raises(Exception, match=r"pip install 'resfuse-jax\[deploy\]'.*then python -m"):
    predictor.resolve_backend("onnxruntime", tmp_path)
  assert onnx_runtime.INSTALL_HINT in onnx_runtime.export_hint()


def _record(pathname: str, message: str, level: str = "WARNING"):
  import logging as std

  return std.LogRecord("x", getattr(std, level), pathname, 1, message, (), None)


def test_the_tpu_and_orbax_read_only_lines_are_silenced_and_other_warnings_kept():
  quiet = writers._QuietLibraries()
  tpu = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so"
  assert not quiet.filter(_record("/site-packages/jax/_src/xla_bridge.py", tpu, "INFO"))
  ro = "Given directory is read only=/w/checkpoints"
  assert not quiet.filter(_record("/site-packages/orbax/checkpoint/checkpoint_manager.py", ro))
  assert quiet.filter(_record("/site-packages/orbax/checkpoint/x.py", "disk almost full"))
  assert quiet.filter(_record("/site-packages/jax/_src/xla_bridge.py", "no GPU found"))


def test_the_first_eta_leaves_out_the_compiling_step(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
  progress = loop.Progress(total_steps=101, start_step=0)
  clock[0] = 60.0  # the first step traces and compiles for a minute
  progress.step_done(1)
  assert progress.report(1) is None  # nothing measured yet
  for step in range(2, 12):
    clock[0] += 1.0  # then one step per second
    progress.step_done(step)
  speed = progress.report(11)
  assert speed["steps_per_sec"] == pytest.approx(1.0) and speed["eta_sec"] == pytest.approx(90)


def test_reports_say_once_that_en_is_et():
  from resfuse_jax.evaluation import report

  result = {
    "model": "resfuse", "cases": 2, "dataset": "brats", "steps": 4,
    "dice": {"WT": 0.9, "TC": 0.8, "ET": 0.7, "mean": 0.8},
  }  # fmt: skip
  md = report.results_markdown([result], ["WT", "TC", "ET"])
  assert "DSC EN" in md and md.count("EN (the paper's name) is ET") == 1
  lesion = {**result, "dice": {"lesion": 0.5}, "recall": {"lesion": 0.6}}
  assert "paper's name" not in report.results_markdown([lesion], ["lesion"])


def test_case_figures_have_a_colour_legend(tmp_path, monkeypatch):
  from resfuse_jax import visualize

  seen = []
  real = visualize.save_figure

  def capture(fig, path, dpi, bottom=0.0):
    seen.append([t.get_text() for legend in fig.legends for t in legend.get_texts()])
    return real(fig, path, dpi, bottom)

  monkeypatch.setattr(visualize, "save_figure", capture)
  labels = np.zeros((16, 16, 8), np.uint8)
  labels[4:8, 4:8, 2:5] = 3
  scan = np.random.default_rng(0).normal(size=labels.shape).astype(np.float32)
  visualize.case_figure(tmp_path / "b.png", "b", scan, scan, labels, labels)
  visualize.case_figure(tmp_path / "l.png", "l", scan, scan, labels > 0, None, brats_colours=False)
  assert seen == [list(visualize.BRATS_LABEL_NAMES.values()), ["lesion"]]
  assert (tmp_path / "b.png").stat().st_size > 1000


def test_tensorboard_is_in_an_extra_and_the_readme_says_which():
  import tomllib

  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  assert any(dep.startswith("tensorboard") for dep in extras["viz"])
  assert "pip install -e '.[viz]'" in (ROOT / "README.md").read_text()


def test_a_first_run_that_failed_before_training_does_not_block_the_corrected_one(tmp_path):
  w = tmp_path / "w"
  main = [
    sys.executable,
    "-m",
    "resfuse_jax.main",
    "--config=configs/brats.py:smoke",
    f"--workdir={w}",
  ]
  code, _, stderr = cli(*main, f"--config.data.root={tmp_path / 'typo'}")
  assert code == 1 and "BraTS data folder not found" in stderr
  assert (w / "config.json").is_file()  # what the failed run left
  code, _, stderr = cli(*main, f"--config.data.root={tmp_path / 'BraTS2023'}")
  assert code == 1 and "Traceback" not in stderr
  (line,) = error_lines(stderr)
  assert "another model or data" not in line and "BraTS data folder not found" in line
  assert "BraTS2023" in json.loads((w / "config.json").read_text())["data"]["root"]
