import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
from conftest import ROOT

# A non-canonical affine: axes permuted, one flipped, anisotropic, oblique origin.
AFFINE = np.array([[0, 0, -1.2, 30], [0, 1.5, 0, -12], [0.9, 0, 0, 7], [0, 0, 0, 1]], float)


def run_predict(*args):
  cmd = [sys.executable, "-m", "resfuse_jax.predict", *args]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


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


def test_loading_builds_the_model_once_and_decides_the_rules_then(trained_workdir, monkeypatch):
  """Issue 25: the predictor built its model twice and had its rules overwritten after loading."""
  from resfuse_jax import task as task_lib
  from resfuse_jax import workdir
  from resfuse_jax.inference import postprocess
  from resfuse_jax.inference.predictor import Predictor

  calls = []
  real = task_lib.Task.from_config.__func__

  def counted(cls, config):
    calls.append(config.model.name)
    return real(cls, config)

  monkeypatch.setattr(task_lib.Task, "from_config", classmethod(counted))
  auto = Predictor.load(trained_workdir)
  assert len(calls) == 1
  saved = postprocess.read_rules(trained_workdir / workdir.POSTPROCESSING, auto.task.region_names)
  assert auto.rules == saved
  assert Predictor.load(trained_workdir, postprocessing="none").rules is None
