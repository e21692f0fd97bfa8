"""Readers for the three layouts, the cache, and bad-input handling, on tiny synthetic NIfTI."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

from resfuse_jax import config_lib, data
from resfuse_jax.data import breast, cache, manifest, preprocessing

AFFINE = np.array([[0, 0, -1.5, 20], [0, 0.8, 0, -10], [1.0, 0, 0, 5], [0, 0, 0, 1]], float)


def volumes(seed, shape=(12, 14, 10)):
  rng = np.random.default_rng(seed)
  pre = np.zeros(shape, np.float32)
  pre[2:-2, 2:-2, 2:-2] = rng.uniform(100, 200, (shape[0] - 4, shape[1] - 4, shape[2] - 4))
  label = np.zeros(shape, np.uint8)
  label[4:7, 5:8, 4:6] = 1
  post = pre + 150 * label
  return pre, post, label


def save(arr, path, affine=AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(arr, affine), str(path))


def write_breast(root, n=3):
  for i in range(n):
    cid = f"DUKE_{i:03d}"
    pre, post, label = volumes(i)
    save(pre, root / "images" / cid / f"{cid}_0000.nii.gz")
    save(post, root / "images" / cid / f"{cid}_0001.nii.gz")
    save(post * 0.9, root / "images" / cid / f"{cid}_0002.nii.gz")
    save(label, root / "segmentations" / "expert" / f"{cid}.nii.gz")
  return root


def write_manifest(root, n=3, rows=None):
  lines = ["case_id,pre,post,label"]
  for i in range(n):
    pre, post, label = volumes(i)
    for kind, arr in (("pre", pre), ("post", post), ("label", label)):
      save(arr, root / "vols" / f"c{i}_{kind}.nii.gz")
    lines.append(f"c{i},vols/c{i}_pre.nii.gz,vols/c{i}_post.nii.gz,vols/c{i}_label.nii.gz")
  (root / "cases.csv").write_text("\n".join(rows or lines) + "\n")
  return root / "cases.csv"


class Cfg(dict):
  """A dict with attribute access and ``get``, standing in for a ConfigDict."""

  __getattr__ = dict.__getitem__


def cfg(tmp_path, **kw):
  base = {
    **config_lib.base_config("resfuse").data.to_dict(),
    "name": "breast",
    "post_phase": 1,
    "cache_dir": str(tmp_path / "cache"),
    "preprocess_workers": 1,
  }
  return Cfg({**base, **kw})


def test_breast_layout_reads_the_chosen_phase(tmp_path):
  root = write_breast(tmp_path / "mama")
  files = breast.find_cases(root)
  assert [f.case_id for f in files] == ["DUKE_000", "DUKE_001", "DUKE_002"]
  assert files[0].post.name == "DUKE_000_0001.nii.gz"
  assert breast.find_cases(root, post_phase=2)[0].post.name == "DUKE_000_0002.nii.gz"
  missing = breast.find_cases(root, post_phase=5)[0]  # listed; refused when read
  with pytest.raises(data.DataError, match=r"DUKE_000.*_0005.nii.gz.*found"):
    preprocessing.preprocess_case(missing, (0, 1))


def test_breast_missing_segmentation_and_empty_folder(tmp_path):
  root = write_breast(tmp_path / "mama", n=1)
  (root / "segmentations" / "expert" / "DUKE_000.nii.gz").unlink()
  (listed,) = breast.find_cases(root)
  with pytest.raises(data.DataError, match="DUKE_000: missing segmentation"):
    preprocessing.preprocess_case(listed, (0, 1))
  assert breast.find_cases(root, require_label=False)[0].problem is None
  (tmp_path / "empty" / "images").mkdir(parents=True)
  with pytest.raises(data.DataError, match="no case folders"):
    breast.find_cases(tmp_path / "empty")
  with pytest.raises(data.DataError, match="no images/ folder"):
    breast.find_cases(tmp_path / "nothing")


def test_manifest_relative_paths_and_errors(tmp_path):
  csv = write_manifest(tmp_path)
  files = manifest.find_cases(csv)
  assert [f.case_id for f in files] == ["c0", "c1", "c2"]
  assert files[0].pre == tmp_path / "vols" / "c0_pre.nii.gz"
  bad = tmp_path / "bad.csv"
  bad.write_text("case_id,pre,post\nc0,a,b\n")
  with pytest.raises(data.DataError, match=r"lacks columns \['label'\]"):
    manifest.find_cases(bad)
  bad.write_text("case_id,pre,post,label\nc0,vols/c0_pre.nii.gz,vols/nope.nii.gz,\n")
  (listed,) = manifest.find_cases(bad)
  with pytest.raises(
    data.DataError, match=r"line 2 \(case c0\): post file .*nope.nii.gz not found"
  ):
    preprocessing.preprocess_case(listed, (0, 1))
  with pytest.raises(data.DataError, match=r"manifest .*missing.csv not found"):
    manifest.find_cases(tmp_path / "missing.csv")


def test_affine_disagreement_is_reported(tmp_path):
  root = write_breast(tmp_path / "mama", n=1)
  shifted = AFFINE.copy()
  shifted[0, 3] += 2.0
  pre, post, _ = volumes(0)
  save(post, root / "images" / "DUKE_000" / "DUKE_000_0001.nii.gz", shifted)
  with pytest.raises(
    data.DataError, match=r"DUKE_000: post-contrast file .* affines differ by up to 2"
  ):
    data.prepare(cfg(tmp_path, root=str(root)), progress=False)


def test_canonical_orientation_and_remembered_geometry(tmp_path):
  root = write_breast(tmp_path / "mama", n=1)
  (case,) = data.read_cases(breast.find_cases(root), data.get_dataset("breast"))
  assert case.shape == (12, 14, 10)
  np.testing.assert_allclose(case.affine, AFFINE, atol=1e-6)
  # RAS+ axes: x is the file's axis 2 (1.5 mm), y axis 1 (0.8 mm), z axis 0 (1.0 mm).
  assert case.original_spacing == pytest.approx((1.5, 0.8, 1.0))
  assert case.label.sum() == 3 * 3 * 2


def test_skip_bad_cases_reports_them(tmp_path):
  root = write_breast(tmp_path / "mama", n=4)
  (root / "images" / "DUKE_003" / "DUKE_003_0001.nii.gz").unlink()  # a missing scan file
  pre, _, _ = volumes(1)
  save(
    np.where(pre > 0, np.nan, 0).astype(np.float32),
    root / "images" / "DUKE_001" / "DUKE_001_0000.nii.gz",
  )
  with pytest.raises(data.DataError, match="DUKE_001.*NaN"):
    data.prepare(cfg(tmp_path, root=str(root)), progress=False)
  out, good, bad = data.prepare(cfg(tmp_path, root=str(root), on_bad_case="skip"), progress=False)
  assert good == ["DUKE_000", "DUKE_002"]
  assert [b["case_id"] for b in bad] == ["DUKE_001", "DUKE_003"] and "NaN" in bad[0]["error"]
  assert "missing post-contrast phase" in bad[1]["error"] and "DUKE_003_0001" in bad[1]["error"]
  assert not (out / "DUKE_001").exists() and not (out / "DUKE_003").exists()


def test_cache_is_reused_and_invalidated(tmp_path):
  root = write_breast(tmp_path / "mama", n=2)
  c = cfg(tmp_path, root=str(root))
  out, good, _ = data.prepare(c, progress=False)
  meta = json.loads((out / "DUKE_000" / "meta.json").read_text())
  assert meta["crop"] and meta["normalization"]["method"] == "zscore" and meta["fg_locations"]
  stamp = (out / "DUKE_000" / "pre.npy").stat().st_mtime_ns
  out2, _, _ = data.prepare(c, progress=False)
  assert out2 == out and (out / "DUKE_000" / "pre.npy").stat().st_mtime_ns == stamp  # reused
  out3, _, _ = data.prepare(cfg(tmp_path, root=str(root), normalization="joint"), progress=False)
  assert out3 != out and (out3 / "DUKE_000" / "meta.json").exists()  # new settings, new cache
  time.sleep(0.01)
  pre, _, _ = volumes(7)
  save(pre, root / "images" / "DUKE_001" / "DUKE_001_0000.nii.gz")  # source changed
  data.prepare(c, progress=False)
  assert (out / "DUKE_000" / "pre.npy").stat().st_mtime_ns == stamp
  (case,) = data.load_cases(out, ["DUKE_001"])
  assert isinstance(case.pre, np.memmap)
  assert case.normalization["pre"][0] == pytest.approx(float(pre[pre != 0].mean()), rel=1e-4)


def test_cached_case_matches_in_memory_preprocessing(tmp_path):
  root = write_breast(tmp_path / "mama", n=1)
  out, _, _ = data.prepare(cfg(tmp_path, root=str(root)), progress=False)
  (cached,) = data.load_cases(out, ["DUKE_000"])
  (direct,) = data.read_cases(breast.find_cases(root), data.get_dataset("breast"))
  np.testing.assert_array_equal(cached.post, direct.post)
  np.testing.assert_array_equal(cached.label, direct.label)
  assert np.isin(cached.label[tuple(cached.fg_locations[0].T)], [1]).all()


def test_resampling_to_target_spacing(tmp_path):
  root = write_breast(tmp_path / "mama", n=1)
  settings = data.PrepSettings(target_spacing=(1.0, 1.0, 1.0))
  case = data.preprocess_case(breast.find_cases(root)[0], breast.LABELS, settings)
  crop = [b - a for a, b in case.crop]
  expected = [round(n * s) for n, s in zip(crop, case.original_spacing)]
  assert list(case.pre.shape) == expected and case.label.shape == case.pre.shape
  assert set(np.unique(case.label)) <= {0, 1} and case.spacing == (1.0, 1.0, 1.0)


def test_interrupted_preprocessing_resumes_without_corrupt_cases(tmp_path):
  csv = write_manifest(tmp_path / "m", n=40)
  cache_dir = tmp_path / "cache"
  cmd = [
    sys.executable,
    "-m",
    "resfuse_jax.preprocess",
    "--config=configs/manifest.py",
    f"--config.data.manifest={csv}",
    f"--config.data.cache_dir={cache_dir}",
    "--workers=1",
  ]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  done = []
  while time.time() < deadline and proc.poll() is None:
    outs = list(cache_dir.glob("manifest-*/c*/meta.json"))
    if len(outs) >= 3:
      done = outs
      break
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert done, "preprocessing finished or stalled before it could be interrupted"
  (out,) = list(cache_dir.glob("manifest-*"))
  complete = {p.parent.name for p in out.glob("c*/meta.json")}
  assert 3 <= len(complete) < 40
  for case_dir in out.glob("c*"):  # nothing half-written under a final name
    assert (case_dir / "meta.json").exists() and (case_dir / "label.npy").exists()
  stamps = {c: (out / c / "pre.npy").stat().st_mtime_ns for c in complete}
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
  assert len(list(out.glob("c*/meta.json"))) == 40
  # A killed writer's temporary folder may remain (removed once stale); it is never a case.
  assert {p.name for p in out.iterdir() if not p.name.startswith(".tmp-")} == {
    f"c{i}" for i in range(40)
  }
  assert all((out / c / "pre.npy").stat().st_mtime_ns == t for c, t in stamps.items())


def test_parallel_build_equals_serial(tmp_path):
  csv = write_manifest(tmp_path / "m", n=4)
  a, _, _ = data.prepare(
    cfg(tmp_path, name="manifest", manifest=str(csv), cache_dir=str(tmp_path / "a")),
    workers=2,
    progress=False,
  )
  b, _, _ = data.prepare(
    cfg(tmp_path, name="manifest", manifest=str(csv), cache_dir=str(tmp_path / "b")),
    workers=1,
    progress=False,
  )
  for cid in ("c0", "c3"):
    np.testing.assert_array_equal(np.load(a / cid / "post.npy"), np.load(b / cid / "post.npy"))
  assert cache.is_complete(a / "c0", manifest.find_cases(csv)[0])


def test_training_on_a_manifest_skips_and_reports_a_bad_case(tmp_path):
  from test_train import run_cli

  csv = write_manifest(tmp_path / "m", n=6)
  pre, post, label = volumes(3)
  save(post[:-1], tmp_path / "m" / "vols" / "c3_post.nii.gz")  # shape mismatch
  workdir = tmp_path / "run"
  run_cli(
    workdir,
    f"--config.data.manifest={csv}",
    "--config.data.on_bad_case=skip",
    "--config.data.num_folds=2",
    "--config.train.steps=2",
    "--config.data.patch_size=(8,8,8)",
    f"--config.data.cache_dir={tmp_path / 'cache'}",
    config="configs/manifest.py:resfuse,smoke",
  )
  bad = json.loads((workdir / "bad_cases.json").read_text())
  assert [b["case_id"] for b in bad] == ["c3"] and "shape" in bad[0]["error"]
  splits = json.loads((workdir / "splits.json").read_text())
  assert "c3" not in splits["train"] + splits["val"]
  results = json.loads((workdir / "results.json").read_text())
  assert results["dataset"] == "manifest" and set(results["dice"]) == {"lesion", "mean"}


def test_stale_temporary_folders_are_removed_fresh_ones_kept(tmp_path):
  root = write_breast(tmp_path / "mama", n=1)
  c = cfg(tmp_path, root=str(root))
  out = data.cache_dir(c)
  old, fresh = out / ".tmp-DUKE_000-dead", out / ".tmp-DUKE_000-busy"
  for d in (old, fresh):
    d.mkdir(parents=True)
  two_hours_ago = time.time() - 7200
  os.utime(old, (two_hours_ago, two_hours_ago))
  data.prepare(c, progress=False)
  assert not old.exists() and fresh.exists()
