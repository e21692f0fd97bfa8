"""workdir.Workdir owns W: its file names, lock, resume rules, same-run rule, splits, results."""

import ast
import json
import subprocess
import sys

import pytest
from conftest import ROOT, smoke_config

from resfuse_jax import config_lib, workdir
from resfuse_jax.errors import CheckpointError, DataError, WorkdirBusy
from resfuse_jax.workdir import Results, Workdir

W_FILES = [
  value
  for name, value in vars(workdir).items()
  if name.isupper() and isinstance(value, str) and name not in {"RUN_IDENTITY"}
]


def _string_literals(path):
  """Every string literal of a module that could be a path (no spaces), f-string parts
  included; docstrings, messages and flag names are prose, not paths."""
  tree = ast.parse(path.read_text())
  flag_names = {
    id(node.args[0])
    for node in ast.walk(tree)
    if isinstance(node, ast.Call)
    and getattr(node.func, "attr", getattr(node.func, "id", "")).startswith("DEFINE")
    and node.args
  }
  docstrings = {
    id(node.body[0].value)
    for node in ast.walk(tree)
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    and node.body
    and isinstance(node.body[0], ast.Expr)
    and isinstance(node.body[0].value, ast.Constant)
  }
  return [
    n.value
    for n in ast.walk(tree)
    if isinstance(n, ast.Constant)
    and isinstance(n.value, str)
    and " " not in n.value
    and id(n) not in docstrings | flag_names
  ]


def _spells(literal: str, name: str) -> bool:
  if "." in name:  # a file name: anywhere in a path or message
    return name in literal
  return literal == name or literal.endswith(f"/{name}") or literal.startswith(f"{name}/")


def test_every_file_name_of_w_is_spelled_in_workdir_alone():
  assert {"config.json", "results.json", "metrics.csv", "splits.json", ".lock"} <= set(W_FILES)
  spelled = {
    (name, str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "resfuse_jax").rglob("*.py"))
    for literal in _string_literals(path)
    for name in W_FILES
    if _spells(literal, name)
  }
  assert {where for _, where in spelled} == {"resfuse_jax/workdir.py"}, sorted(spelled)


def test_paths_are_under_w_and_evaluate_gets_its_own_folder(tmp_path):
  w = Workdir(tmp_path)
  assert w.config_file == tmp_path / "config.json" and w.results_file == tmp_path / "results.json"
  assert w.checkpoints_dir == tmp_path / "checkpoints" and w.splits_file.parent == tmp_path
  out = w.eval_dir(7, tta=True)
  assert isinstance(out, Results) and not isinstance(out, Workdir)
  assert out.path == tmp_path / "eval-7-tta" and w.eval_dir(7, tta=False).path.name == "eval-7"
  assert out.results_file.name == w.results_file.name  # the same names, another folder
  assert w.sweep_file("sweep.md") == tmp_path / "sweep.md"
  with pytest.raises(ValueError, match="sweep"):
    w.sweep_file("sweep.txt")


def test_results_round_trip(tmp_path):
  w = Workdir(tmp_path / "w")
  assert w.read_results() is None
  w.make().write_results({"steps": 3, "dice": {"WT": 0.5}})
  assert w.read_results() == {"steps": 3, "dice": {"WT": 0.5}}
  w.results_file.write_text("{broken")
  with pytest.raises(CheckpointError, match="results.json is not valid JSON"):
    w.read_results()


def test_the_lock_refuses_a_second_holder_naming_the_first(tmp_path):
  w = Workdir(tmp_path / "w")
  holder = subprocess.Popen(
    [sys.executable, "-c",
     "import sys; from resfuse_jax.workdir import Workdir\n"
     "with Workdir(sys.argv[1]).lock('comparison'):\n  print('held', flush=True); sys.stdin.read()",
     str(w.path)],
    cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusy, match=rf"in use by another training run: .*pid {holder.pid}"):
      with w.lock():
        pass
  finally:
    holder.kill()
    holder.wait()
  with w.lock() as path:
    assert path == w.path / ".lock"


def test_claim_writes_the_config_and_refuses_another_model_leaving_w_as_it_was(tmp_path):
  w = Workdir(tmp_path)
  config = smoke_config()
  w.claim(config)
  assert json.loads(w.config_file.read_text())["model"]["name"] == "resfuse"
  (w.checkpoints_dir / "2").mkdir(parents=True)  # a saved step: there is a run to protect
  before = w.config_file.read_bytes()
  with pytest.raises(CheckpointError, match=r"another model or data.*model.name: 'resfuse'"):
    w.claim(smoke_config("resunet"))
  assert w.config_file.read_bytes() == before
  # runtime-only settings and the train/eval sections may change on resume
  w.claim(smoke_config(**{"data.read_threads": 1, "model.conv_impl": "xla", "train.lr": 0.5}))


def test_a_workdir_without_a_checkpoint_takes_new_settings(tmp_path):
  """A first run that failed before its first save (e.g. no data root) blocks no rerun."""
  w = Workdir(tmp_path)
  w.claim(smoke_config(**{"data.root": str(tmp_path / "wrong")}))
  w.splits_file.write_text('{"train": ["a"], "val": ["b"]}')  # made from the wrong data
  (w.checkpoints_dir / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)  # an unfinished save
  w.claim(smoke_config("resunet"))
  assert json.loads(w.config_file.read_text())["model"]["name"] == "resunet"
  assert not w.splits_file.exists()


def test_an_older_config_json_resumes_its_missing_keys_filled(tmp_path):
  config = smoke_config()
  saved = json.loads(json.dumps(config.to_dict()))
  del saved["model"]["remat"], saved["model"]["variant"], saved["data"]["pre_noise"]
  del saved["train"]["grad_accum"]  # keys added after this run was written
  assert workdir.resume_conflicts(saved, config) == []
  assert workdir.differences(saved, config) == []
  (tmp_path / "config.json").write_text(json.dumps(saved))
  filled = workdir.read_config(tmp_path)
  assert filled.model.remat is False and filled.model.variant == "resfuse"
  assert filled.data.pre_noise == 0.0 and filled.train.grad_accum == 1
  config.model.remat = True
  assert workdir.resume_conflicts(saved, config) == ["model.remat: False -> True"]


def test_the_same_run_allows_runtime_settings_only(tmp_path):
  w = Workdir(tmp_path)
  config = smoke_config()
  w.claim(config)
  assert w.finished_run(config) is None  # no results yet
  w.write_results({"steps": config.train.steps})
  w.metrics_file.write_text("case\n")
  assert w.finished_run(config) == {"steps": config.train.steps}
  assert w.finished_run(smoke_config(**{"data.workers": 2})) is not None
  for changed in ({"train.lr": 0.5}, {"seed": 1}, {"eval.max_cases": 1}, {"train.steps": 9}):
    assert w.finished_run(smoke_config(**changed)) is None, changed


def test_splits_are_made_once_and_kept_on_resume(tmp_path):
  w = Workdir(tmp_path)
  data_cfg = config_lib.load(f"{ROOT}/configs/phantom.py:smoke").data
  ids = [f"c{i}" for i in range(10)]
  splits = w.splits(ids, data_cfg)
  assert sorted(splits["train"] + splits["val"]) == ids and splits["fold"] == 0
  w.write_splits(splits, [{"case_id": "bad", "error": "x"}])
  assert json.loads(w.bad_cases_file.read_text())[0]["case_id"] == "bad"
  data_cfg.split_seed = 99  # a resumed run keeps its fold whatever the seed now says
  assert w.splits(ids + ["c10"], data_cfg) == splits == w.read_splits()
  with pytest.raises(DataError, match="no longer found"):
    w.splits(ids[1:], data_cfg)
  with pytest.raises(CheckpointError, match="not a training workdir"):
    Workdir(tmp_path / "empty").read_splits()
