"""Inference-only export: predict --model=E without the workdir, and the jax.export artifact."""

import json
import shutil
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from test_predict import run_predict

from resfuse_jax import data
from resfuse_jax.data import brats
from resfuse_jax.errors import CheckpointError
from resfuse_jax.inference import prediction, predictor
from resfuse_jax.inference.predictor import Predictor
from resfuse_jax.serving import exporting


@pytest.fixture(scope="module")
def workdir_and_export(trained_workdir, tmp_path_factory):
  workdir, out = trained_workdir, tmp_path_factory.mktemp("export") / "model"
  cmd = [sys.executable, "-m", "resfuse_jax.export", f"--workdir={workdir}", f"--output={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, out


def test_export_holds_config_metadata_params_and_serving_artifact(workdir_and_export):
  workdir, out = workdir_and_export
  meta = json.loads((out / "export.json").read_text())
  assert meta["step"] == 2 and meta["regions"] == ["WT", "TC", "ET"]
  assert meta["label_values"] == [2, 1, 3] and meta["serving"]["platforms"] == ["cpu", "cuda"]
  assert json.loads((out / "config.json").read_text()) == json.loads(
    (workdir / "config.json").read_text()
  )
  assert not (out / "checkpoints").exists()  # no optimiser state, no training checkpoints
  ours, theirs = Predictor.load(out), Predictor.load(workdir)
  assert ours.step == theirs.step == 2
  for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert meta["params"] == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(ours.params))


def test_serving_artifact_reproduces_the_predictions(workdir_and_export):
  workdir, out = workdir_and_export
  loaded = Predictor.load(workdir)
  patch = tuple(loaded.config.data.patch_size)
  tiles = np.random.default_rng(0).normal(size=(3, *patch, 2)).astype(np.float32)  # n=3: symbolic
  served = np.asarray(exporting.load_serving(out).call(tiles))
  expected = np.asarray(predictor.window_probabilities(loaded.model, loaded.params, tiles))
  assert served.shape == (3, *patch, 3)
  np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)


def test_predict_with_the_export_alone_matches_the_workdir(
  workdir_and_export, small_phantom, tmp_path
):
  workdir, out = workdir_and_export
  root, _ = small_phantom
  case = brats.find_cases(root)[0]
  reference = tmp_path / "from_workdir.nii.gz"
  files = data.CaseFiles(case.case_id, case.pre, case.post, None)
  prediction.predict_case(Predictor.load(workdir), files, reference)

  moved = tmp_path / "model_elsewhere"
  shutil.copytree(out, moved)
  hidden = workdir.with_name("run_hidden")
  workdir.rename(hidden)  # the export must not need the training workdir
  try:
    seg = tmp_path / "from_export.nii.gz"
    run_predict(f"--model={moved}", f"--pre={case.pre}", f"--post={case.post}", f"--out={seg}")
  finally:
    hidden.rename(workdir)
  a, b = nib.load(str(reference)), nib.load(str(seg))
  np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
  np.testing.assert_array_equal(a.affine, b.affine)


def test_export_refuses_to_overwrite_and_predict_refuses_a_non_export(workdir_and_export):
  workdir, out = workdir_and_export
  with pytest.raises(CheckpointError, match="already exists"):
    exporting.export_model(workdir, out)
  cmd = [
    sys.executable,
    "-m",
    "resfuse_jax.predict",
    f"--model={workdir}",
    "--input=x",
    "--output=y",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1 and "is not an export: export.json is missing" in proc.stderr
  assert "Traceback" not in proc.stderr
