"""Fault injection, one group per class of the reliability audit (BUILD_NOTES §9).

Each test damages something the way a user, a disk or a second job would, and
checks the outcome: a one-line error naming the file and the problem, or a
correct result, with nothing written outside the folders named and nothing lost.
"""

import contextlib
import gzip
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, smoke_config

from resfuse_jax import checkpointing, data, files, train
from resfuse_jax.data import brats, cache, common, geometry, manifest
from resfuse_jax.errors import (
  CheckpointError,
  DataError,
  OutputError,
  WorkdirBusy,
)
from resfuse_jax.inference import prediction
from resfuse_jax.inference.predictor import Predictor
from resfuse_jax.workdir import Workdir, resume_conflicts

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
TRAIN = {"train.steps": 4, "checkpoint.every_steps": 2, "checkpoint.keep": 3}


def write_nifti(path, array, zooms=(1.0, 1.0, 1.0), affine=None):
  img = nib.Nifti1Image(array, np.diag([*zooms, 1.0]) if affine is None else affine)
  img.header.set_zooms(zooms)
  nib.save(img, str(path))
  return path


def phantom_case(small_phantom, index=0) -> data.CaseFiles:
  return brats.find_cases(small_phantom[0])[index]


def cli(module, *args, timeout=300):
  cmd = [sys.executable, "-m", f"resfuse_jax.{module}", *args]
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc) -> str:
  """The CLI's user-error contract: exit 1, the last stderr line 'error: ...', no traceback."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), proc.stderr[-3000:]
  return last


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before damaging it)."""
  workdir = tmp_path_factory.mktemp("faults") / "run"
  train.train_and_evaluate(smoke_config(**TRAIN), str(workdir))
  return workdir


def copy_run(trained, tmp_path) -> Path:
  return Path(shutil.copytree(trained, tmp_path / "run"))


def flip_byte(folder: Path, pattern: str = "*") -> Path:
  """Flips one byte in the middle of the largest file under ``folder`` matching ``pattern``.

  In an Orbax step, ``d/*`` are the arrays' data chunks; the largest file overall is the
  tree metadata (JSON) for a model this small.
  """
  candidates = [p for p in folder.rglob(pattern) if p.is_file()]
  target = max(candidates, key=lambda p: p.stat().st_size)
  blob = bytearray(target.read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  target.write_bytes(bytes(blob))
  return target


# ----- 1. Names are not paths -----------------------------------------------------------


@pytest.mark.parametrize(
  "case_id", ["../escape", "/abs/path", ".hidden", "a/b", "a\\b", "tab\there", "ok\x7f"]
)
def test_case_ids_that_are_paths_are_refused_naming_the_manifest_line(tmp_path, case_id):
  vol = write_nifti(tmp_path / "v.nii.gz", np.ones((4, 4, 4), np.float32))
  csv = tmp_path / "m.csv"
  csv.write_text(f"case_id,pre,post,label\nfine,{vol},{vol},\n{case_id},{vol},{vol},\n")
  with pytest.raises(DataError, match=r"m\.csv line 3: case ID .* case IDs are used as file"):
    manifest.find_cases(csv, require_label=False)


def test_no_path_leaves_its_root(tmp_path, small_phantom):
  """The one helper every output and cache path goes through, and the cache that uses it."""
  root = tmp_path / "root"
  root.mkdir()
  (root / "link").symlink_to(tmp_path)  # a name that is fine but resolves outside
  assert files.under(root, "case.nii.gz") == (root / "case.nii.gz").resolve()
  for parts in (("..", "x"), ("/etc/passwd",), ("link", "x")):
    with pytest.raises(DataError, match="outside"):
      files.under(root, *parts)
  # A reader bypassed: the cache still refuses an ID that would leave its folder.
  good = phantom_case(small_phantom)
  for bad_id in ("../outside", str(tmp_path / "abs")):
    evil = data.CaseFiles(bad_id, good.pre, good.post, good.label)
    with pytest.raises(DataError, match="case ID"):
      cache.write_case(evil, root, data.PrepSettings(), brats.REGIONS, brats.LABELS)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
  assert sorted(p.name for p in root.iterdir()) == ["link"]


def test_predict_folder_with_a_traversal_id_writes_nothing(
  trained_workdir, small_phantom, tmp_path
):
  case = phantom_case(small_phantom)
  csv = tmp_path / "cases.csv"
  csv.write_text(f"case_id,pre,post,label\n../../victim,{case.pre},{case.post},\n")
  victim = tmp_path / "victim.nii.gz"
  victim.write_bytes(b"precious")
  proc = cli(
    "predict", f"--workdir={trained_workdir}", f"--input={csv}", f"--output={tmp_path / 'o' / 'p'}"
  )
  assert "line 2: case ID '../../victim' contains a path separator" in one_line_error(proc)
  assert victim.read_bytes() == b"precious" and not (tmp_path / "o").exists()


# ----- 2. Checkpoints are verified ------------------------------------------------------


def test_flipped_byte_in_the_latest_step_resumes_from_the_previous_one(
  trained, tmp_path, monkeypatch, caplog
):
  """Depending on where it lands, Orbax fails to read such a flip or reads it without
  complaint (then only the checksums catch it); either way the step is never used."""
  caplog.set_level(logging.WARNING)
  workdir = copy_run(trained, tmp_path)
  flip_byte(workdir / "checkpoints" / "4" / "state", "d/*")  # in the arrays' data
  restored = {}
  real = checkpointing.restore_verified

  def spy(manager, abstract, iterator):
    state, step = real(manager, abstract, iterator)
    restored["step"] = step
    return state, step

  monkeypatch.setattr(checkpointing, "restore_verified", spy)
  results = train.train_and_evaluate(smoke_config(**{**TRAIN, "train.steps": 6}), str(workdir))
  assert restored["step"] == 2 and results["steps"] == 6
  assert "checkpoint step 4 fails verification (" in caplog.text
  (moved,) = (workdir / checkpointing.QUARANTINE).iterdir()
  assert moved.name.startswith("4-") and (moved / "state").is_dir()  # kept for inspection
  assert 6 in checkpointing.checkpoint_steps(workdir / "checkpoints")


def test_checkpoints_whose_arrays_differ_from_their_checksums_are_never_used(trained, tmp_path):
  """A readable step whose arrays changed (as a silent bit flip would) fails verification."""
  workdir = copy_run(trained, tmp_path)
  for step in (2, 4):
    record_path = workdir / "checkpoints" / str(step) / checkpointing.DIGESTS_FILE
    record = json.loads(record_path.read_text())
    first = sorted(k for k in record["arrays"] if k.startswith("params/"))[0]
    record["arrays"][first]["sha256"] = "0" * 64
    record_path.write_text(json.dumps(record))
  config = smoke_config(**TRAIN)
  model, tx = Predictor.load(trained).model, train.make_optimizer(config.train)
  patch = tuple(config.data.patch_size)
  abstract = jax.eval_shape(lambda: train.init_state(model, tx, patch, jax.random.key(0)))
  manager = checkpointing.make_manager(workdir / "checkpoints", keep=3)
  try:
    with pytest.raises(CheckpointError, match=r"step 4: 1 array\(s\) differ.*step 2: 1 array"):
      checkpointing.restore_verified(manager, abstract, None)
    assert checkpointing.newest_verified_step(manager, abstract) is None
  finally:
    manager.close()
  assert sorted(checkpointing.checkpoint_steps(workdir / "checkpoints")) == [2, 4]  # not moved
  with pytest.raises(CheckpointError, match="checkpoint step 4 .* differ from the checksums"):
    Predictor.load(workdir)


def test_predict_and_export_refuse_a_damaged_checkpoint(trained, tmp_path, small_phantom):
  workdir = copy_run(trained, tmp_path)
  flip_byte(workdir / "checkpoints" / "4" / "state")  # in the tree's metadata
  case = phantom_case(small_phantom)
  out = tmp_path / "seg.nii.gz"
  proc = cli(
    "predict", f"--workdir={workdir}", f"--pre={case.pre}", f"--post={case.post}", f"--out={out}"
  )
  assert "checkpoint step 4 in" in one_line_error(proc) and not out.exists()
  proc = cli("export", f"--workdir={workdir}", f"--output={tmp_path / 'E'}")
  assert "checkpoint step 4 in" in one_line_error(proc) and not (tmp_path / "E").exists()
  assert Predictor.load(workdir, step=2).step == 2  # the good step is still usable


def test_a_damaged_export_is_refused(trained, tmp_path):
  from resfuse_jax.serving import exporting

  export = exporting.export_model(trained, tmp_path / "E")
  assert Predictor.load(export).step == 4
  flip_byte(export / "params")
  with pytest.raises(CheckpointError, match=r"export .*(cannot be read|differ from the checksums)"):
    Predictor.load(export)


def test_predict_refuses_nonfinite_probabilities(trained, small_phantom, tmp_path):
  good = Predictor.load(trained)
  poisoned = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), good.params)
  predictor = Predictor(good.config, poisoned, good.step)
  out = tmp_path / "seg.nii.gz"
  with pytest.raises(CheckpointError, match="non-finite probabilities .* Nothing was written"):
    prediction.predict_case(predictor, phantom_case(small_phantom), out)
  assert not out.exists() and not list(tmp_path.iterdir())


# ----- 3. Inputs are bounded before they are read -------------------------------------


def header_only(path: Path, shape, dtype=np.int16, data: bytes = b"") -> Path:
  """A NIfTI file whose header claims ``shape``; only ``data`` follows it."""
  header = nib.Nifti1Header()
  header.set_data_shape(shape)
  header.set_data_dtype(dtype)
  header["vox_offset"] = 352
  blob = header.binaryblock + b"\0" * 4 + data
  path.write_bytes(gzip.compress(blob, 1) if path.name.endswith(".gz") else blob)
  return path


def test_header_bombs_are_refused_before_any_large_allocation(tmp_path):
  """In a child capped at 600 MiB of address space: reading either bomb would need GBs."""
  tiny = header_only(tmp_path / "tiny.nii.gz", (30000, 30000, 30000))
  # A gzip bomb: 800³ int16 (1 GB) of zeros; its first 64 MiB here, ~300 KiB on disk.
  bomb = header_only(tmp_path / "bomb.nii.gz", (800, 800, 800), data=b"\0" * (64 * 2**20))
  assert tiny.stat().st_size < 200 and bomb.stat().st_size < 2**20
  cap = 600 * 2**20
  script = (
    "import resource, sys\n"
    f"resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n"
    "from pathlib import Path\n"
    "from resfuse_jax.data import common\n"
    "for p in sys.argv[1:]:\n"
    "  try:\n"
    "    common.load_canonical(Path(p), 'c1', 'pre-contrast')\n"
    "    print('READ', p)\n"
    "  except common.DataError as e:\n"
    "    print('REFUSED', e)\n"
  )
  env = {**ENV, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
  proc = subprocess.run(
    [sys.executable, "-c", script, str(tiny), str(bomb)],
    env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 2 and all(line.startswith("REFUSED") for line in lines), proc.stdout
  assert "30000x30000x30000 voxels" in lines[0] and "data.max_voxels" in lines[0]
  assert "800x800x800" in lines[1]


@pytest.mark.parametrize(
  "kind, make, message",
  [
    ("complex", lambda: (np.ones((8, 8, 8), np.complex64), (1.0,) * 3), "data type complex64"),
    ("nan spacing", lambda: (np.ones((8, 8, 8), np.float32), (1.0, np.nan, 1.0)), "spacing"),
    ("huge spacing", lambda: (np.ones((8, 8, 8), np.float32), (1e30, 1.0, 1.0)), "spacing"),
    ("tiny spacing", lambda: (np.ones((8, 8, 8), np.float32), (1e-6, 1.0, 1.0)), "spacing"),
  ],
)
def test_inputs_that_are_not_real_scans_are_refused(tmp_path, kind, make, message):
  array, zooms = make()
  path = tmp_path / "x.nii.gz"
  write_nifti(path, array, zooms if np.isfinite(zooms).all() else (1.0, 1.0, 1.0))
  if not np.isfinite(zooms).all():  # nibabel will not set a NaN zoom: patch the header
    img = nib.load(str(path))
    img.header["pixdim"][1:4] = zooms
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, img.header), str(path))
  with pytest.raises(DataError, match=rf"case c: pre-contrast file .*x\.nii\.gz .*{message}"):
    common.load_canonical(path, "c", "pre-contrast")


def test_a_resampled_size_over_the_cap_is_refused(tmp_path):
  """15 mm voxels resampled to 1 mm: 48³ would become 720³ (373 M voxels)."""
  rng = np.random.default_rng(0)  # real-looking scans (a constant one is refused first)
  vol = (1 + rng.random((2, 48, 48, 48))).astype(np.float32)
  pre = write_nifti(tmp_path / "pre.nii.gz", vol[0], (15.0, 15.0, 15.0))
  post = write_nifti(tmp_path / "post.nii.gz", vol[1], (15.0, 15.0, 15.0))
  files_ = data.CaseFiles("c", pre, post, None)
  settings = data.PrepSettings(target_spacing=(1.0, 1.0, 1.0))
  with pytest.raises(DataError, match=r"case c: resampling .*would make 720x720x720"):
    data.preprocess_case(files_, brats.LABELS, settings)


def test_every_preprocessing_failure_is_a_data_error_that_skip_covers(
  small_phantom, tmp_path, monkeypatch
):
  from resfuse_jax.data import preprocessing

  cases = brats.find_cases(small_phantom[0])[:3]
  real = preprocessing.normalize

  def flaky(pre, post, method):
    if flaky.calls == 1:
      flaky.calls += 1
      raise MemoryError()
    if flaky.calls == 2:
      flaky.calls += 1
      raise KeyError("surprise")
    flaky.calls += 1
    return real(pre, post, method)

  flaky.calls = 1
  monkeypatch.setattr(preprocessing, "normalize", flaky)
  good, bad = cache.build(
    cases, tmp_path / "c", data.PrepSettings(), brats.REGIONS, brats.LABELS,
    on_bad_case="skip", progress=False,
  )  # fmt: skip
  assert good == [cases[2].case_id]
  assert "out of memory while preprocessing" in bad[0]["error"]
  assert "preprocessing failed: KeyError" in bad[1]["error"]


# ----- 7. Clear words -----------------------------------------------------------------


def with_sform(path: Path, vol: np.ndarray, affine: np.ndarray) -> Path:
  """A file whose only orientation is the sform ``affine`` (nibabel will not build one)."""
  header = nib.Nifti1Header()
  header.set_data_shape(vol.shape)
  header.set_data_dtype(vol.dtype)
  header.set_sform(affine, code=1)
  header.set_qform(None, code=0)
  nib.save(nib.Nifti1Image(vol, None, header), str(path))
  return path


def test_bad_affines_folders_and_link_loops_are_named(tmp_path):
  vol = np.ones((8, 8, 8), np.float32)
  zero = with_sform(tmp_path / "zero.nii.gz", vol, np.zeros((4, 4)))
  with pytest.raises(DataError, match="zero or non-finite affine"):
    common.load_canonical(zero, "c", "pre-contrast")
  singular = np.diag([1.0, 1.0, 1.0, 1.0])
  singular[:3, 2] = singular[:3, 0]  # the third axis equals the first
  flat = with_sform(tmp_path / "flat.nii.gz", vol, singular)
  with pytest.raises(DataError, match="singular affine"):
    common.load_canonical(flat, "c", "pre-contrast")
  folder = tmp_path / "folder.nii.gz"
  folder.mkdir()
  with pytest.raises(DataError, match="is a folder, expected a file"):
    common.load_canonical(folder, "c", "pre-contrast")
  loop = tmp_path / "loop.nii.gz"
  loop.symlink_to(loop)
  with pytest.raises(DataError, match="is a symbolic link loop"):
    common.load_canonical(loop, "c", "pre-contrast")
  dangling = tmp_path / "dangling.nii.gz"
  dangling.symlink_to(tmp_path / "gone")
  with pytest.raises(DataError, match="broken symbolic link"):
    common.load_canonical(dangling, "c", "pre-contrast")


# ----- 4. One run per workdir ---------------------------------------------------------


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  workdir = tmp_path / "w"
  holder = subprocess.Popen(
    [sys.executable, "-c",
     "import sys; from resfuse_jax.workdir import Workdir\n"
     "with Workdir(sys.argv[1]).lock():\n  print('held', flush=True); sys.stdin.read()",
     str(workdir)],
    cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(
      WorkdirBusy, match=rf"in use by another training run: host .* pid {holder.pid}"
    ):
      train.train_and_evaluate(smoke_config(), str(workdir))
    assert not (workdir / "config.json").exists()
    proc = cli("main", "--config=configs/phantom.py:resfuse,smoke", f"--workdir={workdir}")
    assert f"pid {holder.pid}" in one_line_error(proc)
  finally:
    holder.kill()  # kill -9: the kernel releases the lock
    holder.wait()
  with Workdir(workdir).lock():
    pass


def test_a_resume_with_another_model_is_refused_and_changes_nothing(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  for overrides, diff in (
    ({"model.name": "resunet"}, "model.name: 'resfuse' -> 'resunet'"),
    ({"data.patch_size": (24, 24, 24)}, "data.patch_size"),
  ):
    with pytest.raises(CheckpointError, match=rf"another model or data.*{diff}"):
      train.train_and_evaluate(smoke_config(**{**TRAIN, **overrides}), str(workdir))
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert after == before
  # Settings that change neither parameters nor data may differ on resume.
  ok = smoke_config(**{**TRAIN, "data.read_threads": 2, "model.conv_impl": "planes"})
  assert resume_conflicts(json.loads((workdir / "config.json").read_text()), ok) == []


# ----- 5. The cache is verified -------------------------------------------------------


@pytest.fixture
def built_cache(small_phantom, tmp_path):
  cases = brats.find_cases(small_phantom[0])[:2]
  out = tmp_path / "cache"
  good, _ = cache.build(
    cases, out, data.PrepSettings(), brats.REGIONS, brats.LABELS, progress=False
  )
  assert good == [c.case_id for c in cases]
  return cases, out


def _damage_truncate(case_dir):
  p = case_dir / "pre.npy"
  p.write_bytes(p.read_bytes()[:-100])
  return "has .* bytes"


def _damage_header(case_dir):
  p = case_dir / "post.npy"
  blob = bytearray(p.read_bytes())
  blob[:10] = b"garbage!!!"
  p.write_bytes(bytes(blob))
  return "not a readable .npy file"


def _damage_shape(case_dir):
  np.save(case_dir / "label.npy", np.zeros((3, 3, 3), np.uint8))
  return "has .* bytes|holds uint8"


def _damage_meta(case_dir):
  meta = json.loads((case_dir / "meta.json").read_text())
  del meta["crop"]
  (case_dir / "meta.json").write_text(json.dumps(meta))
  return "metadata lacks"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_header, _damage_shape, _damage_meta])
def test_a_damaged_cached_case_is_named_on_load_and_rebuilt(built_cache, damage):
  cases, out = built_cache
  case_dir = out / cases[0].case_id
  reference = np.load(case_dir / "pre.npy").copy()
  message = damage(case_dir)
  with pytest.raises(DataError, match=message):
    cache.load_case(case_dir)
  good, bad = cache.build(
    cases, out, data.PrepSettings(), brats.REGIONS, brats.LABELS, progress=False
  )
  assert good == [c.case_id for c in cases] and not bad
  np.testing.assert_array_equal(cache.load_case(case_dir).pre, reference)


def test_a_tampered_cached_array_is_found_the_first_time_a_process_opens_it(
  built_cache, monkeypatch, caplog
):
  """Issue 26, class 6: same shape, dtype and size, changed in place: only the hash can
  tell, and it is checked the first time a process opens the case (not only --verify):
  loading refuses it, a build (train, evaluate, preprocess) rebuilds it with a warning."""
  cases, out = built_cache
  case_dir = out / cases[1].case_id
  pre = np.load(case_dir / "pre.npy")
  tampered = pre.copy()
  tampered[0, 0, 0] += 1.0
  np.save(case_dir / "pre.npy", tampered)
  monkeypatch.setattr(cache, "_HASHED", set())  # a new process
  with pytest.raises(DataError, match="pre.npy differs from the SHA-256"):
    cache.load_case(case_dir)
  assert "differs from the SHA-256" in cache.case_problem(case_dir, cases[1])
  assert cache.case_problem(case_dir, cases[1], hashes=False) is None  # the cheap checks pass
  with caplog.at_level("WARNING"):
    cache.build(cases, out, data.PrepSettings(), brats.REGIONS, brats.LABELS, progress=False)
  assert f"cached case {cases[1].case_id} is damaged, rebuilding it" in caplog.text
  np.testing.assert_array_equal(np.load(case_dir / "pre.npy"), pre)
  monkeypatch.setattr(cache, "_HASHED", set())  # another new process
  hashed, real = [], files.sha256
  monkeypatch.setattr(files, "sha256", lambda p: hashed.append(p) or real(p))
  cache.load_case(case_dir)
  arrays = len(json.loads((case_dir / "meta.json").read_text())["arrays"])
  assert len(hashed) == arrays >= 3  # every array hashed on the first open...
  cache.load_case(case_dir)
  assert len(hashed) == arrays  # ...and not again in the same process for the same files
  tampered[0, 0, 0] += 1.0
  np.save(case_dir / "pre.npy", tampered)  # a later change in place: hashed again
  assert "differs from the SHA-256" in cache.case_problem(case_dir, cases[1])
  assert len(hashed) > arrays
  cache.build(
    cases, out, data.PrepSettings(), brats.REGIONS, brats.LABELS, progress=False, verify=True
  )
  np.testing.assert_array_equal(np.load(case_dir / "pre.npy"), pre)


# ----- 6. Outputs are atomic and errors are plain -----------------------------------


@contextlib.contextmanager
def mounted(folder: Path, options: str):
  """``folder`` as a read-only bind mount or a tiny tmpfs (root cannot be kept out by chmod)."""
  folder.mkdir(parents=True, exist_ok=True)
  if options == "ro" and os.geteuid() != 0:
    folder.chmod(0o555)
    try:
      yield folder
    finally:
      folder.chmod(0o755)
    return
  if options == "ro":
    cmds = [["mount", "--bind", str(folder), str(folder)],
            ["mount", "-o", "remount,bind,ro", str(folder)]]  # fmt: skip
  else:
    cmds = [["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]]
  for cmd in cmds:
    if subprocess.run(cmd, capture_output=True).returncode != 0:
      subprocess.run(["umount", str(folder)], capture_output=True)
      pytest.skip(f"cannot {' '.join(cmd)} here (needs root with mount rights)")
  try:
    yield folder
  finally:
    subprocess.run(["umount", str(folder)], check=True)


def test_an_unwritable_output_is_one_line_and_leaves_no_file(
  trained_workdir, small_phantom, tmp_path
):
  case = phantom_case(small_phantom)
  with mounted(tmp_path / "ro", "ro") as ro:
    proc = cli(
      "predict",
      f"--workdir={trained_workdir}",
      f"--pre={case.pre}",
      f"--post={case.post}",
      f"--out={ro / 'seg.nii.gz'}",
    )
    assert str(ro) in one_line_error(proc)
    assert list(ro.iterdir()) == []
  with pytest.raises(OutputError, match="it is a folder"):
    files.write_json(tmp_path, {})
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(OutputError, match="a parent of it is a file|not a folder|Not a directory"):
    files.write_json(blocker / "sub" / "r.json", {})


def test_a_full_disk_leaves_no_partial_label_map(small_cases, tmp_path):
  case = small_cases[0]
  noise = np.random.default_rng(0).integers(0, 256, case.pre.shape).astype(np.uint8)
  with mounted(tmp_path / "full", "size=16k") as full:
    with pytest.raises(OutputError, match=r"seg\.nii\.gz: No space left"):
      geometry.save_label_map(noise, case, full / "seg.nii.gz")
    assert list(full.iterdir()) == []


def test_predict_folder_skips_bad_cases_when_asked(trained_workdir, small_phantom, tmp_path):
  cases = brats.find_cases(small_phantom[0])[:3]
  src = tmp_path / "in"
  for c in cases:
    shutil.copytree(c.pre.parent, src / c.pre.parent.name)
  broken = src / cases[0].case_id / cases[0].pre.name
  broken.write_bytes(b"not a nifti")
  missing = src / cases[2].case_id / cases[2].post.name
  missing.unlink()  # a scan file that is not there is skipped too
  out = tmp_path / "out"
  proc = cli("predict", f"--workdir={trained_workdir}", f"--input={src}", f"--output={out}")
  assert str(broken) in one_line_error(proc)
  proc = cli(
    "predict",
    f"--workdir={trained_workdir}",
    f"--input={src}",
    f"--output={out}",
    "--on_bad_case=skip",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped 2 bad case(s)" in proc.stdout
  assert {p.name for p in out.iterdir()} == {"bad_cases.json", f"{cases[1].case_id}.nii.gz"}
  entry, gone = json.loads((out / "bad_cases.json").read_text())
  assert entry["case_id"] == cases[0].case_id and str(broken) in entry["error"]
  assert gone["case_id"] == cases[2].case_id and f"{missing} not found" in gone["error"]


def test_kill_9_leaves_nonempty_event_files(tmp_path):
  workdir = tmp_path / "w"
  cmd = [
    sys.executable, "-m", "resfuse_jax.main", "--config=configs/phantom.py:resfuse,smoke",
    f"--workdir={workdir}", "--config.train.steps=500", "--config.train.log_every=1",
    "--config.checkpoint.every_steps=2", "--config.eval.every_steps=1000",
    "--config.data.augment.preset=none",
  ]  # fmt: skip
  proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stderr:
      if "step 7/500" in line:  # the save of step 6 began after step 4's had committed
        break
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert 4 in checkpointing.checkpoint_steps(workdir / "checkpoints")
  (events,) = workdir.glob("events.out.tfevents.*")
  assert events.stat().st_size > 0
  assert max(loss_steps(events)) >= 4


def loss_steps(path: Path) -> list[int]:
  """Steps of the ``train/loss`` scalars in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  blob, steps, at = path.read_bytes(), [], 0
  while at + 12 <= len(blob):
    (length,) = struct.unpack("<Q", blob[at : at + 8])
    event = event_pb2.Event.FromString(blob[at + 12 : at + 12 + length])
    steps += [event.step for v in event.summary.value if v.tag == "train/loss"]
    at += 12 + length + 4
  return steps
