"""Reliability 3, classes 2, 3 and 5: the data, the cache and the environment.

Each test plants one fault (a degenerate scan, a config pointing elsewhere, a
read-only cache, a latin-1 manifest ...) and checks the outcome: one line naming
the case or file and the problem, inputs unchanged, nothing written elsewhere.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from test_faults import mounted

from resfuse_jax import data
from resfuse_jax.data import brats, cache, manifest, phantom
from resfuse_jax.data.preprocessing import preprocess_case
from resfuse_jax.errors import DataError, OutputError
from resfuse_jax.inference import prediction
from resfuse_jax.train import inputs

LABELS = brats.LABELS
N = 20


def head(seed=0, n=N) -> np.ndarray:
  """A positive 'scan' on a ball, zero outside (so cropping keeps a margin)."""
  rng = np.random.default_rng(seed)
  z, y, x = np.mgrid[:n, :n, :n] - (n - 1) / 2
  ball = (z**2 + y**2 + x**2) < (0.4 * n) ** 2
  return np.where(ball, 100 + 20 * rng.standard_normal((n, n, n)), 0).astype(np.float32)


def lesion(n=N) -> np.ndarray:
  label = np.zeros((n, n, n), np.float32)
  label[8:12, 8:12, 8:12] = 3
  return label


def save(path: Path, array, affine=None) -> Path:
  nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
  return path


def case_files(tmp_path, pre, post, label=None, cid="c1", affines=(None, None, None)):
  folder = tmp_path / cid[:40]
  folder.mkdir(parents=True, exist_ok=True)
  return data.CaseFiles(
    cid,
    save(folder / "pre.nii.gz", pre, affines[0]),
    save(folder / "post.nii.gz", post, affines[1]),
    None if label is None else save(folder / "seg.nii.gz", label, affines[2]),
  )


def tree(root: Path) -> dict[str, int]:
  return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


# ----- 3. Degenerate inputs are refused -----------------------------------------------


def near_constant():
  v = np.zeros((N, N, N), np.float32)
  values = np.float32([1000.0, 1000.0001220703125, 1000.000244140625])
  v[2:-2, 2:-2, 2:-2] = values[np.arange((N - 4) ** 3) % 3].reshape((N - 4,) * 3)
  return v


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: np.where(head() > 0, 7.0, 0).astype(np.float32), "1 distinct value"),
    (lambda: np.where(head() > 0, np.where(head(1) > 100, 5.0, 6.0), 0), "2 distinct value"),
    (near_constant, "near-constant: the std .* below 1e-06 of their mean absolute value"),
  ],
)
def test_constant_scans_are_refused_naming_the_case_and_statistic(tmp_path, make, message):
  files = case_files(tmp_path, head(), make().astype(np.float32), lesion())
  with pytest.raises(DataError, match=f"case c1: post-contrast file .*post.nii.gz is .*{message}"):
    preprocess_case(files, LABELS)


def test_non_integer_labels_are_refused_not_rounded(tmp_path):
  label = lesion()
  label[9, 9, 9] = 1.5
  files = case_files(tmp_path, head(), head(1), label)
  with pytest.raises(DataError, match=r"seg.nii.gz has non-integer value 1.5 at voxel \(9, 9, 9\)"):
    preprocess_case(files, LABELS)
  label[9, 9, 9] = 3.0004  # within 1e-3: a float label map's rounding noise
  ok = case_files(tmp_path / "ok", head(), head(1), label)
  assert preprocess_case(ok, LABELS).label.max() == 3


def test_values_not_finite_after_the_float32_cast_are_refused(tmp_path):
  post = head(1).astype(np.float64)
  post[10, 10, 10] = 1e39  # finite on disk, inf as float32
  files = case_files(tmp_path, head(), post, lesion())
  with pytest.raises(DataError, match="case c1: the cast of .* to float32 gives NaN or Inf"):
    preprocess_case(files, LABELS)


def test_normalisation_that_overflows_is_refused(tmp_path):
  pre = head() * np.float32(1e-32)  # finite, tiny: the joint std is ~2e-31
  post = head(1) * np.float32(1e31)  # z-scored by that std (floored at 1e-8): inf as float32
  files = case_files(tmp_path, pre, post, lesion())
  with pytest.raises(DataError, match="case c1: the joint normalisation of .* gives NaN or Inf"):
    preprocess_case(files, LABELS, data.PrepSettings(normalization="joint"))


def test_identical_pre_and_post_refused_in_training_warned_once_in_prediction(tmp_path, caplog):
  files = case_files(tmp_path, head(), head(), lesion())
  with pytest.raises(DataError, match="case c1: the pre-contrast scan .* are identical"):
    preprocess_case(files, LABELS)
  with caplog.at_level(logging.WARNING):
    case = preprocess_case(files, LABELS, training=False)
  assert case.pre.shape == case.post.shape
  assert sum("are identical" in r.getMessage() for r in caplog.records) == 1


def test_the_same_image_flipped_and_transposed_with_its_affine_is_accepted(tmp_path):
  pre, post, label = head(), head(1), lesion()
  reference = preprocess_case(case_files(tmp_path / "ref", pre, post, label), LABELS)
  flip = np.eye(4)
  flip[0, 0], flip[0, 3] = -1, N - 1  # voxel i of the flipped array is voxel N-1-i
  swap = np.eye(4)[[1, 0, 2, 3]]  # voxel (i, j, k) of the transposed array is (j, i, k)
  stored = np.ascontiguousarray(np.swapaxes(post[::-1], 0, 1))
  files = case_files(tmp_path / "flip", pre, stored, label, affines=(None, flip @ swap, None))
  case = preprocess_case(files, LABELS)
  np.testing.assert_array_equal(case.post, reference.post)
  moved = flip @ swap
  moved[:3, 3] += 2.0  # the same storage, 2 mm elsewhere: another space
  bad = case_files(tmp_path / "bad", pre, stored, label, affines=(None, moved, None))
  with pytest.raises(DataError, match="post.nii.gz is not in the same space .* differ by up to 2"):
    preprocess_case(bad, LABELS)


def test_training_without_any_foreground_is_refused(tmp_path):
  cases = [
    case_files(tmp_path / str(i), head(i), head(i + 5), 0 * lesion(), f"c{i}") for i in (1, 2)
  ]
  out = tmp_path / "cache"
  good, _ = cache.build(cases, out, data.PrepSettings(), brats.REGIONS, LABELS, progress=False)
  loaded = data.load_cases(out, good)
  with pytest.raises(DataError, match="none of the 2 training cases has any foreground"):
    inputs.require_foreground(loaded, out)
  loaded[1].fg_locations[0] = np.zeros((1, 3), np.int64)
  inputs.require_foreground(loaded, out)


def test_predict_input_never_demands_the_labels_it_does_not_read(tmp_path):
  files = case_files(tmp_path, head(), head(1), None)
  rows = f"case_id,pre,post,label\nc1,{files.pre},{files.post},{tmp_path / 'missing.nii.gz'}\n"
  (tmp_path / "m.csv").write_text(rows)
  (found,) = data.find_input_cases(tmp_path / "m.csv", None)
  assert found.label is None
  (listed,) = manifest.find_cases(tmp_path / "m.csv", require_label=True)
  assert re.search("line 2 .*label file .*missing.nii.gz not found", listed.problem)


# ----- 5. The environment -------------------------------------------------------------


def test_manifest_with_a_bom_is_read_and_latin1_is_named_by_row(tmp_path):
  files = case_files(tmp_path, head(), head(1), lesion())
  text = f"case_id,pre,post,label\nc1,{files.pre},{files.post},{files.label}\n"
  (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
  (found,) = manifest.find_cases(tmp_path / "bom.csv")
  assert found.case_id == "c1"
  latin = text + "caf\xe9,a,b,c\n"
  (tmp_path / "latin.csv").write_bytes(latin.encode("latin-1"))
  with pytest.raises(DataError, match=r"latin.csv line 3: not UTF-8 text \(byte 0xe9 at column 4"):
    manifest.find_cases(tmp_path / "latin.csv")


def test_a_236_character_case_id_is_named_and_skipped(tmp_path):
  long_id = "x" * 236
  cases = [
    case_files(tmp_path / "a", head(), head(1), lesion(), long_id),
    case_files(tmp_path / "b", head(2), head(3), lesion(), "short"),
  ]
  good, bad = cache.build(
    cases, tmp_path / "cache", data.PrepSettings(), brats.REGIONS, LABELS,
    on_bad_case="skip", progress=False,
  )  # fmt: skip
  assert good == ["short"]
  (entry,) = bad
  assert entry["case_id"] == long_id and "236 bytes long" in entry["error"]
  with pytest.raises(DataError, match="case x{40}...: its case ID is 236 bytes long"):
    cache.build(cases, tmp_path / "c2", data.PrepSettings(), brats.REGIONS, LABELS, progress=False)


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.NII.GZ", "seg.Nii", "seg.nii"])
def test_label_map_suffixes_in_any_letter_case_are_written_as_nifti(small_cases, tmp_path, name):
  from resfuse_jax.data import geometry

  out = prediction.check_label_map_path(tmp_path / name)
  case = small_cases[0]
  geometry.save_label_map(np.ones(case.pre.shape, np.uint8), case, out)
  assert [p.name for p in tmp_path.iterdir()] == [name]
  check = tmp_path / f"check{name[3:].lower()}"  # nibabel's loader wants a lower-case suffix
  shutil.copy(out, check)
  assert nib.load(str(check)).shape == case.shape
  assert prediction.label_map_stem(out) == "seg"


@pytest.mark.parametrize("name", ["seg", "seg.png", ".nii.gz", "seg.nii.zip"])
def test_other_label_map_suffixes_are_refused_before_the_model_loads(tmp_path, name):
  with pytest.raises(OutputError, match="give a name ending in .nii.gz or .nii"):
    prediction.check_label_map_path(tmp_path / name)


def test_predict_refuses_a_png_out_before_loading_any_model(tmp_path):
  pre = save(tmp_path / "pre.nii.gz", head())
  cmd = [
    sys.executable, "-m", "resfuse_jax.predict", f"--workdir={tmp_path / 'no-such-workdir'}",
    f"--pre={pre}", f"--post={pre}", f"--out={tmp_path / 'seg.png'}",
  ]  # fmt: skip
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --out=") and "seg.png" in last and ".nii.gz or .nii" in last


def test_a_read_only_cache_folder_is_one_line_naming_it(tmp_path):
  spec = phantom.PhantomSpec(num_cases=1, shape=(16, 16, 16), seed=1)
  files = case_files(tmp_path / "src", head(), head(1), lesion())
  with mounted(tmp_path / "ro", "ro") as ro:
    with pytest.raises(OutputError, match=f"cannot write the phantom into {ro}/p: Read-only"):
      phantom.write_phantom(ro / "p", spec)
    with pytest.raises(OutputError, match=f"{ro}/c.*Read-only file system"):
      cache.build([files], ro / "c", data.PrepSettings(), brats.REGIONS, LABELS, progress=False)
    assert list(ro.iterdir()) == []


def test_cache_metadata_cannot_name_files_outside_its_entry(tmp_path):
  files = case_files(tmp_path / "src", head(), head(1), lesion())
  out = tmp_path / "cache"
  cache.build([files], out, data.PrepSettings(), brats.REGIONS, LABELS, progress=False)
  meta_path = out / "c1" / "meta.json"
  meta = json.loads(meta_path.read_text())
  np.save(tmp_path / "outside.npy", np.zeros((1, 3), np.int64))
  meta["fg_locations"] = {"WT": "../../outside.npy"}
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(
    DataError, match=r"names '../../outside.npy', which is not a file of the entry"
  ):
    cache.load_case(out / "c1")


# ----- 2. Nothing is written where a workdir's config points -------------------------


def test_evaluate_and_predict_never_write_where_w_config_points(trained_workdir, tmp_path):
  from resfuse_jax.evaluation import evaluation

  w = Path(shutil.copytree(trained_workdir, tmp_path / "w"))
  config = json.loads((w / "config.json").read_text())
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  config["data"]["root"] = str(elsewhere / "phantom")
  config["data"]["cache_dir"] = str(elsewhere / "cache")
  (w / "config.json").write_text(json.dumps(config, indent=1))
  user_cache = tmp_path / "user-cache"
  before = tree(tmp_path)
  out, _ = evaluation.evaluate_workdir(w, figures=False, cache_dir=user_cache)
  cases = brats.find_cases(next(user_cache.glob("phantom-*")))
  predictor = prediction.load_predictor(str(w), None, None)
  prediction.predict_pair(
    predictor, cases[0].pre, cases[0].post, tmp_path / "seg.nii.gz", False, False, False
  )
  after = tree(tmp_path)
  assert list(elsewhere.iterdir()) == []
  new = {p for p in after if p not in before}
  assert all(
    p.split("/")[0] in ("user-cache", "seg.nii.gz") or p.startswith(f"w/{out.name}/") for p in new
  ), new
  assert {p: before[p] for p in before} == {p: after[p] for p in before}
