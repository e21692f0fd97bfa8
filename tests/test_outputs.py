"""Issue 26, class 1: no output of predict, export or evaluate touches what it reads.

Each case is planted and refused with one line naming both paths, and every input
(the scans, the input folder, the workdir W) is byte-identical afterwards.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from resfuse_jax.errors import OutputError
from resfuse_jax.evaluation import evaluation
from resfuse_jax.inference import outputs
from resfuse_jax.inference.prediction import check_outputs
from resfuse_jax.serving import exporting


def tree_hashes(*roots) -> dict:
  out = {}
  for root in roots:
    for path in sorted(Path(root).rglob("*")):
      if path.is_file() and not path.is_symlink():
        out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


@pytest.fixture
def inputs(tmp_path, small_phantom, trained_workdir):
  """--pre/--post files, a BraTS-layout --input folder of one case, and W; their hashes."""
  root, _ = small_phantom
  case = sorted(p for p in root.iterdir() if p.is_dir())[0]
  shutil.copytree(case, tmp_path / "in" / case.name)
  pre = tmp_path / "scans" / "pre.nii.gz"
  pre.parent.mkdir()
  shutil.copy(case / f"{case.name}-t1n.nii.gz", pre)
  shutil.copy(case / f"{case.name}-t1c.nii.gz", pre.with_name("post.nii.gz"))
  read = (pre.parent, tmp_path / "in", trained_workdir)
  before = tree_hashes(*read)
  yield pre, pre.with_name("post.nii.gz"), tmp_path / "in", trained_workdir
  assert tree_hashes(*read) == before  # nothing read was changed, byte for byte


def refused(call, *paths) -> str:
  with pytest.raises(OutputError) as e:
    call()
  message = str(e.value)
  assert "\n" not in message
  for path in paths:
    assert str(path) in message, message
  return message


def test_an_output_file_on_an_input_file_is_refused_in_every_spelling(inputs, tmp_path):
  pre, post, _, w = inputs
  same = lambda out, **kw: lambda: check_outputs(w, None, (str(pre), str(post), str(out)), **kw)  # noqa: E731
  refused(same(pre), pre)
  other = pre.parent / ".." / pre.parent.name / pre.name  # a/../a/x
  refused(same(other), other, pre)
  link = tmp_path / "link.nii.gz"
  link.symlink_to(pre)
  refused(same(link), link, pre)
  hard = tmp_path / "hard.nii.gz"
  os.link(post, hard)
  assert "same file" in refused(same(hard), hard, post)
  # --probabilities would land on an input: <name>_probabilities.nii.gz
  probs_input = pre.with_name("seg_probabilities.nii.gz")
  os.replace(pre, probs_input)
  pre.symlink_to(probs_input)  # keep the fixture's tree as it was, through a link
  refused(
    lambda: check_outputs(
      w, None, (str(probs_input), str(post), str(pre.parent / "seg.nii.gz")), probs=True
    ),
    probs_input,
  )
  pre.unlink()
  os.replace(probs_input, pre)
  check_outputs(
    w, None, (str(pre), str(post), str(tmp_path / "ok" / "seg.nii.gz")), probs=True, figure=True
  )


def test_outputs_in_or_around_the_workdir_are_refused(inputs, tmp_path):
  pre, post, _, w = inputs
  pair = lambda out: lambda: check_outputs(w, None, (str(pre), str(post), str(out)))  # noqa: E731
  refused(pair(w / "seg.nii.gz"), w)
  refused(pair(w / "checkpoints" / "seg.nii.gz"), w)
  hard = tmp_path / "seg.nii.gz"
  os.link(w / "config.json", hard)
  assert "hard link" in refused(pair(hard), hard, w)
  folder = lambda out: lambda: check_outputs(w, None, folder=(str(inputs[2]), str(out)))  # noqa: E731
  refused(folder(w), w)
  refused(folder(w.parent), w.parent, w)  # --output contains W


def test_an_output_folder_on_or_around_the_input_is_refused(inputs, tmp_path):
  _, _, folder_in, w = inputs
  folder = lambda inp, out: lambda: check_outputs(w, None, folder=(str(inp), str(out)))  # noqa: E731
  refused(folder(folder_in, folder_in), folder_in)  # --output = --input
  refused(folder(folder_in, folder_in / "preds"), folder_in / "preds", folder_in)
  refused(folder(folder_in, tmp_path), tmp_path, folder_in)  # --input inside --output
  link = tmp_path / "alias"
  link.symlink_to(folder_in)
  refused(folder(folder_in, link), link, folder_in)
  case = next(folder_in.iterdir())
  manifest = tmp_path / "cases.csv"  # a manifest whose files lie inside --output
  manifest.write_text(
    f"case_id,pre,post,label\n{case.name},{case / f'{case.name}-t1n.nii.gz'},"
    f"{case / f'{case.name}-t1c.nii.gz'},\n"
  )
  message = refused(folder(manifest, case), case)
  assert case.name in message
  manifest.unlink()
  check_outputs(w, None, folder=(str(folder_in), str(tmp_path / "out")), probs=True)


def test_export_and_evaluate_never_write_into_or_over_the_workdir(inputs, tmp_path):
  w = inputs[3]
  for out in (w, w / "export", w / "checkpoints" / "export", w.parent):
    refused(lambda out=out: exporting.export_model(w, out), out, w)
  link = tmp_path / "w-alias"
  link.symlink_to(w)
  refused(lambda: exporting.export_model(w, link / "export"), w)
  refused(lambda: evaluation.pool_folds([w], w / "postprocessing.json"), w)
  assert not (tmp_path / "export").exists()


def test_predict_never_writes_into_the_export_it_reads(inputs, tmp_path):
  pre, post, _, w = inputs
  e = tmp_path / "E"
  e.mkdir()
  (e / "export.json").write_text("{}")  # only its presence matters before the model loads
  out = e / "seg.nii.gz"
  refused(lambda: check_outputs(None, str(e), (str(pre), str(post), str(out))), out, e)
  with pytest.raises(Exception, match="is not an export"):
    check_outputs(None, str(w), (str(pre), str(post), str(tmp_path / "seg.nii.gz")))


def test_the_rule_alone_compares_identities_not_names(tmp_path):
  a = tmp_path / "a.txt"
  a.write_text("x")
  outputs.refuse_overlaps([("--o", tmp_path / "b.txt")], input_files=[("--i", a)])
  os.link(a, tmp_path / "b.txt")
  refused(
    lambda: outputs.refuse_overlaps([("--o", tmp_path / "b.txt")], input_files=[("--i", a)]), a
  )
  assert a.read_text() == "x"


def test_the_cli_refuses_before_loading_the_model(inputs, tmp_path):
  pre, post, folder_in, w = inputs
  cmd = [sys.executable, "-m", "resfuse_jax.predict", f"--workdir={w}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  tree = sorted(tmp_path.rglob("*"))
  for args in (
    [f"--pre={pre}", f"--post={post}", f"--out={pre.parent / '..' / 'scans' / 'post.nii.gz'}"],
    [f"--input={folder_in}", f"--output={folder_in}"],
  ):
    proc = subprocess.run(
      [*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "refusing to write over" in last, proc.stderr[-3000:]
    assert str(folder_in if "--input" in args[0] else post) in last
  assert sorted(tmp_path.rglob("*")) == tree  # nothing written anywhere
