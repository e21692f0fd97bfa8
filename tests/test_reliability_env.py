"""Reliability 3, class 5: full disks, killed exports and terminated preprocessing.

Full disks are planted with a small tmpfs (``test_faults.mounted``), and tensorstore's
RESOURCE_EXHAUSTED (not an ``OSError``) by injecting it at the write call.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax.numpy as jnp
import pytest
from conftest import ROOT
from test_faults import mounted

from resfuse_jax import checkpointing, files
from resfuse_jax.errors import OutputError
from resfuse_jax.inference.predictor import Predictor
from resfuse_jax.serving import exporting

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def state(n=300):
  return {"step": jnp.zeros(()), "params": {"w": jnp.ones((n, n))}, "opt_state": {}}


def everything(root: Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_full_disk_during_an_async_checkpoint_save_leaves_no_step(tmp_path):
  with mounted(tmp_path / "disk", "size=64k") as disk:
    manager = checkpointing.make_manager(disk / "ckpt", 3)
    data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
    with pytest.raises(OutputError, match=f"cannot save a checkpoint in {disk}/ckpt: No space"):
      checkpointing.save(manager, 1, state(), data_iter)
      checkpointing.wait_for_saves(manager)
    assert everything(disk / "ckpt") == []  # nothing partial, nothing a run would restore
    assert checkpointing.checkpoint_steps(disk / "ckpt") == []
    manager.close()
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    manager = checkpointing.make_manager(disk / "ckpt", 3)  # space freed: the same step saves
    checkpointing.save(manager, 1, state(), data_iter)
    checkpointing.wait_for_saves(manager)
    manager.close()
    assert checkpointing.checkpoint_steps(disk / "ckpt") == [1]


def test_tensorstore_resource_exhausted_in_a_checkpoint_save_is_one_line(tmp_path, monkeypatch):
  manager = checkpointing.make_manager(tmp_path / "ckpt", 3)
  data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())

  def full(step, **kwargs):
    (tmp_path / "ckpt" / f"{step}.orbax-checkpoint-tmp-123").mkdir(parents=True)
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "ckpt/d/1": [OS error 28]')

  monkeypatch.setattr(manager, "save", full)
  with pytest.raises(OutputError, match=r"ckpt: no space left .*partial step was removed"):
    checkpointing.save(manager, 1, state(8), data_iter)
  assert everything(tmp_path / "ckpt") == []
  manager.close()


def test_tensorstore_resource_exhausted_is_recognised_through_its_causes():
  inner = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/d/abc": [OS error 28]')
  try:
    try:
      raise inner
    except ValueError as e:
      raise RuntimeError("async save failed") from e
  except RuntimeError as outer:
    assert "RESOURCE_EXHAUSTED" in files.disk_full_reason(outer)
  assert files.disk_full_reason(OSError(28, "No space left on device")) == "No space left on device"
  assert files.disk_full_reason(ValueError("shape mismatch")) is None


@pytest.fixture(scope="module")
def predictor(trained_workdir):
  return Predictor.load(trained_workdir, None)


def test_an_export_that_runs_out_of_space_is_one_line_and_leaves_nothing(predictor, tmp_path):
  with mounted(tmp_path / "disk", "size=64k") as disk:
    with pytest.raises(OutputError, match=f"{disk}/E.*(No space left|RESOURCE_EXHAUSTED)"):
      exporting.write_export(predictor, disk / "E", onnx="no")
    assert everything(disk) == []


def test_tensorstore_resource_exhausted_during_an_export_is_one_line(
  predictor, tmp_path, monkeypatch
):
  def full(path, params):
    (Path(path) / "params").mkdir()
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "params/d/1": [OS error 28]')

  monkeypatch.setattr(checkpointing, "save_export_params", full)
  with pytest.raises(OutputError, match=r"cannot write the export .*/E: no space left .*nothing"):
    exporting.write_export(predictor, tmp_path / "E", onnx="no")
  assert everything(tmp_path) == []


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_the_next_export_removes_a_killed_exports_temporary_never_a_live_one(predictor, tmp_path):
  import socket

  host = socket.gethostname()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    for name, pid in ((".A.tmp-dead", dead_pid()), (".B.tmp-live", live.pid)):
      (tmp_path / name).mkdir()
      (tmp_path / name / files.TMP_OWNER).write_text(f"{host} {pid}\n")
      (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / ".C.tmp-unowned").mkdir()  # no owner record: not ours to judge
    exporting.write_export(predictor, tmp_path / "E", onnx="no")
  finally:
    live.kill()
    live.wait()
  names = sorted(p.name for p in tmp_path.iterdir())
  assert names == [".B.tmp-live", ".C.tmp-unowned", "E"]
  assert files.TMP_OWNER not in {p.name for p in (tmp_path / "E").iterdir()}


def children(pid: int) -> set[int]:
  out = set()
  for task in Path(f"/proc/{pid}/task").iterdir():
    text = (task / "children").read_text().split()
    out.update(int(c) for c in text)
  return out


def running(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


def test_sigterm_to_preprocess_ends_its_worker_processes(tmp_path):
  cmd = [
    sys.executable, "-m", "resfuse_jax.preprocess", "--config=configs/phantom.py",
    "--workers=2", f"--cache_dir={tmp_path / 'cache'}", "--config.data.phantom_cases=40",
    f"--config.data.root={tmp_path / 'phantom'}",
  ]  # fmt: skip
  proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
  workers: set[int] = set()
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      cache = list((tmp_path / "cache").glob("*/.tmp-*")) if (tmp_path / "cache").exists() else []
      if cache:  # the workers are writing cases
        workers = {
          c for c in children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()
        }
        if len(workers) == 2:
          break
      time.sleep(0.05)
    assert len(workers) == 2 and proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode != 0
  deadline = time.time() + 15
  while time.time() < deadline and any(running(w) for w in workers):
    time.sleep(0.1)
  assert not any(running(w) for w in workers), "worker processes outlived preprocess"


def test_predict_input_skips_a_236_character_case_and_never_reads_labels(
  predictor, small_phantom, tmp_path
):
  import json

  from resfuse_jax.data import brats
  from resfuse_jax.inference import prediction

  a, b = brats.find_cases(small_phantom[0])[:2]
  garbage = tmp_path / "seg.nii.gz"
  garbage.write_bytes(b"not a nifti")  # a label file predict must not read
  long_id = "y" * 236
  rows = f"case_id,pre,post,label\n{long_id},{a.pre},{a.post},\nok,{b.pre},{b.post},{garbage}\n"
  (tmp_path / "m.csv").write_text(rows)
  out = tmp_path / "out"
  written, bad = prediction.predict_folder(
    predictor, tmp_path / "m.csv", out, False, False, False, on_bad_case="skip"
  )
  assert [p.name for p in written] == ["ok.nii.gz"]
  (entry,) = bad
  assert entry["case_id"] == long_id and "236 bytes long" in entry["error"]
  assert json.loads((out / "bad_cases.json").read_text()) == bad
  assert garbage.read_bytes() == b"not a nifti"
