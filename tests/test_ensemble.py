"""Issue 30 (part): a cross-validation's folds as one model at predict, export and evaluate."""

import hashlib
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from test_faults import flip_byte, one_line_error

from resfuse_jax.errors import CheckpointError, ConfigError, OutputError


def run(command, *args, check=True):
  cmd = [sys.executable, "-m", f"resfuse_jax.{command}", *args]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def voxels(path):
  return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def cv(cross_validation_workdir):
  return cross_validation_workdir[0]


@pytest.fixture(scope="module")
def case(cv):
  """One case of the smoke phantom the folds trained on: its pre- and post-contrast files."""
  from resfuse_jax import data, workdir

  first = data.find_cases(data.confined_to_user_cache(workdir.read_config(cv).data))[0]
  return str(first.pre), str(first.post)


@pytest.fixture(scope="module")
def ensemble_run(cv, case, tmp_path_factory):
  """``predict --workdir=W --probabilities --backend=jax`` of ``case``: (its label map, the
  command). JAX, what the folds alone are compared with; OpenVINO's: test_openvino_runs_*."""
  out = tmp_path_factory.mktemp("ensemble") / "seg.nii.gz"
  proc = run("predict", f"--workdir={cv}", f"--pre={case[0]}", f"--post={case[1]}",
             f"--out={out}", "--probabilities", "--backend=jax")  # fmt: skip
  return out, proc


@pytest.fixture(scope="module")
def ensemble_export(cv, tmp_path_factory):
  out = tmp_path_factory.mktemp("export") / "E"
  proc = run("export", f"--workdir={cv}", f"--output={out}")
  assert "an ensemble of 2 folds (0, 1)" in proc.stdout
  return out


def probabilities(label_map):
  return voxels(label_map.with_name(label_map.name.replace(".nii.gz", "_probabilities.nii.gz")))


def test_predict_averages_the_probabilities_of_the_folds(cv, case, ensemble_run, tmp_path):
  from resfuse_jax.inference import prediction
  from resfuse_jax.inference.predictor import Predictor

  out, proc = ensemble_run
  assert "(ensemble of 2 folds: 0, 1; steps 2, 2; jax)" in proc.stdout
  own = []
  for k in (0, 1):  # each fold alone, as predict --workdir=W/fold_<k> computes it
    alone = Predictor.load(cv / f"fold_{k}")
    path = prediction.predict_pair(alone, *case, str(tmp_path / f"{k}.nii.gz"), False, True, False)
    own.append(probabilities(path))
  assert np.abs(own[0] - own[1]).max() > 1e-3  # two different models: the mean is a real test
  np.testing.assert_allclose(probabilities(out), (own[0] + own[1]) / 2, atol=1e-5)
  one = tmp_path / "one.nii.gz"
  proc = run("predict", f"--workdir={cv}", "--folds=1", f"--pre={case[0]}", f"--post={case[1]}",
             f"--out={one}", "--probabilities", "--backend=jax")  # fmt: skip
  assert "(ensemble of 1 fold: 1; step 2; jax)" in proc.stdout
  np.testing.assert_allclose(probabilities(one), own[1], atol=1e-6)


def test_the_mean_per_window_equals_the_mean_of_the_volumes(cv, case):
  """The Gaussian blend is linear: `MeanWindow` (evaluation's form) is exact too."""
  from resfuse_jax import data
  from resfuse_jax.inference import tiler
  from resfuse_jax.inference.ensemble import EnsemblePredictor

  ens = EnsemblePredictor.load(cv)
  settings = (ens.task.dataset.label_values, ens.task.prep_settings, ens.task.input_limits)
  files = data.CaseFiles("c", *case, None)
  volume = data.preprocess_case(files, *settings, training=False)
  per_window = tiler.predict_volume(ens.window_fn(), volume, ens.config)
  np.testing.assert_allclose(per_window, ens.probabilities(volume), atol=1e-5)


def test_fold_choices_that_cannot_run_are_one_line(cv, case, tmp_path):
  from resfuse_jax import workdir
  from resfuse_jax.inference import ensemble, prediction
  from resfuse_jax.inference.predictor import Predictor

  pair = [f"--pre={case[0]}", f"--post={case[1]}", f"--out={tmp_path / 's.nii.gz'}"]
  last = one_line_error(run("predict", f"--workdir={cv}", "--folds=7", *pair, check=False))
  assert "--folds=7: folds must be 0 .. 1" in last
  last = one_line_error(
    run("predict", f"--workdir={cv / 'fold_0'}", "--folds=0", *pair, check=False)
  )
  assert "--folds needs a cross-validation" in last
  with pytest.raises(ConfigError, match="--step names one checkpoint"):
    prediction.check_model_flags(str(cv), 2, None)
  with pytest.raises(ConfigError, match="'all' or fold numbers"):
    ensemble.members(cv, "one")
  with pytest.raises(OutputError, match="lies inside --workdir"):  # W is protected whole
    prediction.check_outputs(str(cv), None, (*case, str(cv / "fold_0" / "s.nii.gz")))
  with pytest.raises(CheckpointError, match="is a cross-validation"):
    Predictor.load(cv)
  w = workdir.Workdir(tmp_path / "W")  # folds 0 and 1 of 3 trained, fold 0 finished
  w.write_folds(3, [0, 1])
  with pytest.raises(CheckpointError, match=f"{w.path} holds no finished fold"):
    ensemble.members(w.path)
  w.fold(0).make().write_results({})
  assert ensemble.members(w.path) == [(0, w.fold(0).path)]
  with pytest.raises(CheckpointError, match="fold 1 of .* has not finished training"):
    ensemble.members(w.path, "0,1")
  with pytest.raises(ConfigError, match="trains folds 0, 1, not 2"):
    ensemble.members(w.path, "2")


def test_export_packs_the_ensemble(cv, case, ensemble_export, ensemble_run, tmp_path):
  from resfuse_jax.inference import onnx_runtime, prediction
  from resfuse_jax.inference.ensemble import EnsemblePredictor
  from resfuse_jax.inference.predictor import Predictor

  e = ensemble_export
  meta = json.loads((e / "export.json").read_text())
  assert meta["format"] == "resfuse_jax-ensemble-1" and meta["members"] == {
    "0": "fold_0",
    "1": "fold_1",
  }
  for name in ("config.json", "postprocessing.json"):  # W's shared config and pooled choice
    assert (e / name).read_bytes() == (cv / name).read_bytes()
  for k in (0, 1):  # each member an ordinary export of its fold
    assert json.loads((e / f"fold_{k}" / "export.json").read_text())["source_workdir"].endswith(
      f"fold_{k}"
    )
  out = tmp_path / "seg.nii.gz"
  proc = run("predict", f"--model={e}", "--backend=jax", f"--pre={case[0]}", f"--post={case[1]}",
             f"--out={out}")  # fmt: skip
  assert "(ensemble of 2 folds: 0, 1; steps 2, 2; jax)" in proc.stdout
  np.testing.assert_array_equal(voxels(out), voxels(ensemble_run[0]))
  with pytest.raises(CheckpointError, match="is an ensemble export"):
    Predictor.load(e)
  if onnx_runtime.available():
    loaded = EnsemblePredictor.load(e, backend="onnxruntime")
    assert loaded.backend == "onnxruntime"
    got = prediction.predict_pair(loaded, *case, str(tmp_path / "o.nii.gz"), False, True, False)
    np.testing.assert_allclose(probabilities(got), probabilities(ensemble_run[0]), atol=1e-4)


def test_openvino_runs_the_folds_of_a_workdir_and_of_its_export(
  cv, case, ensemble_export, ensemble_run, tmp_path
):
  """auto on a CPU: each fold's graph built into the user's cache (W untouched), each
  member's model.onnx of E; both agree with JAX's ensemble."""
  from resfuse_jax.inference import openvino_runtime, precision, prediction
  from resfuse_jax.inference.ensemble import EnsemblePredictor

  if not openvino_runtime.available():  # importorskip would import it with its telemetry
    pytest.skip("openvino is not installed")

  before = {p: p.stat().st_mtime_ns for p in cv.rglob("*")}
  out = tmp_path / "seg.nii.gz"
  proc = run("predict", f"--workdir={cv}", f"--pre={case[0]}", f"--post={case[1]}",
             f"--out={out}", "--probabilities")  # fmt: skip
  assert "(ensemble of 2 folds: 0, 1; steps 2, 2; openvino)" in proc.stdout
  assert proc.stderr.count("built the ONNX graph of") + proc.stderr.count("(cached)") == 2
  np.testing.assert_allclose(probabilities(out), probabilities(ensemble_run[0]), atol=1e-4)
  assert {p: p.stat().st_mtime_ns for p in cv.rglob("*")} == before
  loaded = EnsemblePredictor.load(ensemble_export, backend="auto")
  assert loaded.backend == "openvino"
  got = prediction.predict_pair(loaded, *case, str(tmp_path / "e.nii.gz"), False, True, False)
  np.testing.assert_allclose(probabilities(got), probabilities(ensemble_run[0]), atol=1e-4)
  for k in (0, 1):  # each member records its own fold's bf16 agreement (or why not)
    member = json.loads((ensemble_export / f"fold_{k}" / "export.json").read_text())
    assert "measured" in member[precision.KEY]


def _edit_member_record(e):
  """A member's export.json edited and resealed: only E's own record still tells."""
  from resfuse_jax.inference import integrity

  path = e / "fold_0" / "export.json"
  meta = json.loads(path.read_text())
  meta["step"] = 3
  meta[integrity.RECORD_KEY] = integrity.record_sha256(meta)
  path.write_text(json.dumps(meta))


def _append_space(path):
  with path.open("a") as f:
    f.write(" ")


def test_a_damaged_ensemble_export_is_refused(ensemble_export, case, tmp_path):
  from resfuse_jax.inference import onnx_runtime
  from resfuse_jax.inference.ensemble import EnsemblePredictor

  damage = {
    "fold_1/config.json does not match the SHA-256": lambda e: _append_space(
      e / "fold_1" / "config.json"
    ),
    "fold_0/export.json does not match the SHA-256": _edit_member_record,
    "fold_1/export.json is missing": lambda e: shutil.rmtree(e / "fold_1"),
    "fold_5 is not a member recorded": lambda e: shutil.copytree(e / "fold_0", e / "fold_5"),
    r"export .*(cannot be read|differ from the checksums)": lambda e: flip_byte(
      e / "fold_1" / "params"
    ),
  }
  if onnx_runtime.available():  # read only by the onnxruntime backend, checked when it loads
    damage["model.onnx does not match"] = lambda e: flip_byte(e / "fold_1", "model.onnx")
  for i, (message, harm) in enumerate(damage.items()):
    copy = tmp_path / f"E{i}"
    shutil.copytree(ensemble_export, copy)
    harm(copy)
    backend = "onnxruntime" if "onnx" in message else "jax"  # jax reads the parameters
    with pytest.raises(CheckpointError, match=message):
      EnsemblePredictor.load(copy, backend=backend)
  pair = [f"--pre={case[0]}", f"--post={case[1]}", f"--out={tmp_path / 's.nii.gz'}"]
  last = one_line_error(run("predict", f"--model={tmp_path / 'E0'}", *pair, check=False))
  assert "fold_1/config.json does not match the SHA-256" in last
  assert not (tmp_path / "s.nii.gz").exists()


def test_a_failed_ensemble_export_leaves_nothing(cv, tmp_path, monkeypatch):
  from resfuse_jax.serving import ensembles, exporting

  calls = []

  def second_fails(predictor, output, onnx, workdir, agreement_cases):
    calls.append(output)
    if len(calls) == 2:
      raise RuntimeError("killed while writing the second member")
    output.mkdir()

  monkeypatch.setattr(exporting, "write_export", second_fails)
  with pytest.raises(RuntimeError, match="second member"):
    ensembles.export_ensemble(cv, tmp_path / "E", onnx="no")
  assert len(calls) == 2 and list(tmp_path.iterdir()) == []
  with pytest.raises(OutputError, match="lies inside --workdir"):
    ensembles.export_ensemble(cv, cv / "E")


def _digest(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_evaluate_scores_every_case_once_by_the_fold_that_held_it_out(cv, tmp_path):
  from resfuse_jax.evaluation import metrics

  w = tmp_path / "cv"
  shutil.copytree(cv, w)  # the session's W stays as trained
  trained = sorted(p for p in w.rglob("*") if p.is_file())
  before = {p: _digest(p) for p in trained}
  proc = run("evaluate", f"--workdir={w}", "--nofigures")
  out = w / "eval-folds"
  assert f"wrote {out}" in proc.stdout
  val = {k: json.loads((w / f"fold_{k}" / "splits.json").read_text())["val"] for k in (0, 1)}
  rows = [row["case"] for row in metrics.read_csv(out / "metrics.csv")]
  assert sorted(rows) == sorted(val[0] + val[1]) and len(set(rows)) == len(rows) == 10
  for k in (0, 1):  # each fold scored its own validation cases only
    own = [row["case"] for row in metrics.read_csv(out / f"fold_{k}" / "metrics.csv")]
    assert sorted(own) == sorted(val[k])
  results = json.loads((out / "results.json").read_text())
  assert results["cases"] == 10 and results["tta"] is False
  assert results["cross_validation"] == {"num_folds": 2, "folds": [0, 1], "complete": True}
  assert set(results["folds"]) == {"0", "1"}
  assert (out / "report.md").is_file() and (out / "postprocessing.json").is_file()
  assert {p: _digest(p) for p in trained} == before  # training's files untouched
