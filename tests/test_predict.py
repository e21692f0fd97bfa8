import csv
import json
import shutil
import subprocess
import sys

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from test_train import run_cli

from resfuse_jax import predictor
from resfuse_jax.data import brats

# A non-canonical affine: axes permuted, one flipped, anisotropic, oblique origin.
AFFINE = np.array([[0, 0, -1.2, 30], [0, 1.5, 0, -12], [0.9, 0, 0, 7], [0, 0, 0, 1]], float)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  run_cli(workdir, "--config.train.steps=2")
  return workdir


def run_predict(*args):
  cmd = [sys.executable, "-m", "resfuse_jax.predict", *args]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_region_label_values():
  assert predictor.region_label_values(brats.REGIONS) == [2, 1, 3]
  assert predictor.region_label_values({"lesion": (1,)}) == [1]


def test_probabilities_to_labels_paints_nested_regions():
  probs = np.zeros((6, 6, 6, 3), np.float32)
  probs[0:3, 0:3, 0:3, 0] = 0.9  # WT
  probs[0:2, 0:2, 0:2, 1] = 0.9  # TC
  probs[0, 0, 0, 2] = 0.9  # ET
  labels = predictor.probabilities_to_labels(probs, brats.REGIONS)
  assert labels[0, 0, 0] == 3 and labels[1, 1, 1] == 1 and labels[2, 2, 2] == 2
  assert labels[3, 3, 3] == 0
  high = predictor.probabilities_to_labels(probs, brats.REGIONS, thresholds=[0.95, 0.5, 0.5])
  assert high[2, 2, 2] == 0
  probs[5, 5, 5, 0] = 0.9  # an isolated one-voxel WT component
  pruned = predictor.probabilities_to_labels(probs, brats.REGIONS, min_component_voxels=2)
  assert pruned[5, 5, 5] == 0 and pruned[2, 2, 2] == 2


def test_predict_pair_overlays_a_non_canonical_input(trained_workdir, small_phantom, tmp_path):
  root, _ = small_phantom
  cid = sorted(p.name for p in root.iterdir() if p.is_dir())[0]
  for kind in ("t1n", "t1c"):
    arr = np.asarray(nib.load(root / cid / f"{cid}-{kind}.nii.gz").dataobj)
    arr = np.transpose(arr, (2, 1, 0))[:, ::-1, :28]  # another voxel order, and not cubic
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), AFFINE), str(tmp_path / f"{kind}.nii.gz"))
  out = tmp_path / "pred" / "seg.nii.gz"
  run_predict(
    f"--workdir={trained_workdir}",
    f"--pre={tmp_path / 't1n.nii.gz'}",
    f"--post={tmp_path / 't1c.nii.gz'}",
    f"--out={out}",
    "--probabilities",
    "--tta",
    "--figures",
  )
  src, pred = nib.load(tmp_path / "t1c.nii.gz"), nib.load(out)
  assert pred.shape == src.shape and pred.get_data_dtype() == np.uint8
  np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6)
  labels = np.asarray(pred.dataobj)
  assert set(np.unique(labels)) <= {0, 1, 2, 3}
  head = np.asarray(src.dataobj) != 0
  box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(head))
  outside = np.ones(head.shape, bool)
  outside[box] = False
  assert not labels[outside].any()  # nothing predicted outside the head's box
  probs = nib.load(tmp_path / "pred" / "seg_probabilities.nii.gz")
  assert probs.shape == (*src.shape, 3)
  assert (tmp_path / "pred" / "seg.png").stat().st_size > 1000


def test_predict_folder_names_outputs_like_brats(trained_workdir, small_phantom, tmp_path):
  root, _ = small_phantom
  cases = sorted(p for p in root.iterdir() if p.is_dir())[:2]
  for case in cases:
    shutil.copytree(case, tmp_path / "in" / case.name, ignore=shutil.ignore_patterns("*-seg.*"))
  run_predict(
    f"--workdir={trained_workdir}", f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}"
  )
  names = sorted(p.name for p in (tmp_path / "out").iterdir())
  assert names == [f"{c.name}.nii.gz" for c in cases]
  ref = nib.load(cases[0] / f"{cases[0].name}-t1c.nii.gz")
  assert nib.load(tmp_path / "out" / names[0]).shape == ref.shape


def test_evaluate_writes_per_case_metrics_results_and_report(trained_workdir):
  proc = subprocess.run(
    [sys.executable, "-m", "resfuse_jax.evaluate", f"--workdir={trained_workdir}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  splits = json.loads((trained_workdir / "splits.json").read_text())
  with (trained_workdir / "metrics.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [r["case"] for r in rows] == splits["val"]
  assert {"dice_ET", "recall_TC", "hd95_WT", "lesion_dice_ET", "lesion_hd95_WT"} <= set(rows[0])
  results = json.loads((trained_workdir / "results.json").read_text())
  assert results["cases"] == len(splits["val"]) and results["steps"] == 2
  means = [float(r["dice_WT"]) for r in rows]
  assert results["dice"]["WT"] == pytest.approx(np.mean(means))
  report = (trained_workdir / "report.md").read_text()
  assert "| Methodology | DSC WT | DSC TC | DSC EN | Mean |" in report
  assert "lesion-wise Dice EN" in report
  figures = sorted(p.name for p in (trained_workdir / "figures").iterdir())
  assert figures == [f"{c}.png" for c in splits["val"]]
  image = plt.imread(trained_workdir / "figures" / figures[0])
  assert image.ndim == 3 and image.shape[1] > 4 * image.shape[0]  # one row of 6 panels
