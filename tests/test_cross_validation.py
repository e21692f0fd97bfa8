"""main --folds: every fold into W/fold_<k>/, pooled out-of-fold results, compare over folds."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import CROSS_VALIDATION_ARGS, ROOT
from test_train import run_cli

from resfuse_jax import workdir as workdir_lib
from resfuse_jax.errors import ConfigError
from resfuse_jax.evaluation import metrics


def _fold_val_ids(w, k):
  return json.loads((w / f"fold_{k}" / "splits.json").read_text())["val"]


def test_every_case_is_scored_once_by_the_fold_that_held_it_out(cross_validation_workdir):
  w, proc = cross_validation_workdir
  assert json.loads((w / "folds.json").read_text()) == {"num_folds": 2, "folds": [0, 1]}
  val = {k: _fold_val_ids(w, k) for k in (0, 1)}
  assert not set(val[0]) & set(val[1])
  for k in (0, 1):  # each fold is an ordinary workdir of its own fold
    assert json.loads((w / f"fold_{k}" / "config.json").read_text())["data"]["fold"] == k
    train = json.loads((w / f"fold_{k}" / "splits.json").read_text())["train"]
    assert set(train) == set(val[1 - k])
  pooled = metrics.read_csv(w / "metrics.csv")
  assert sorted(row["case"] for row in pooled) == sorted(val[0] + val[1])
  assert len(pooled) == 10  # the smoke phantom's cases, every one once
  by_fold = {
    row["case"]: row for k in (0, 1) for row in metrics.read_csv(w / f"fold_{k}" / "metrics.csv")
  }
  assert all(row == by_fold[row["case"]] for row in pooled)
  results = json.loads((w / "results.json").read_text())
  assert results["cases"] == 10 and results["steps"] == 2
  assert results["cross_validation"] == {"num_folds": 2, "folds": [0, 1], "complete": True}
  assert set(results["folds"]) == {"0", "1"} and results["folds"]["0"]["cases"] == len(val[0])
  for region, mean in results["dice"].items():
    if region != "mean":
      assert mean == pytest.approx(sum(r[f"dice_{region}"] for r in pooled) / 10)
  chosen = json.loads((w / "postprocessing.json").read_text())
  assert chosen["folds"] == [0, 1] and set(chosen["rules"]) == {"WT", "TC", "ET"}
  after = metrics.read_csv(w / "metrics_postprocessed.csv")
  assert sorted(r["case"] for r in after) == sorted(r["case"] for r in pooled)
  assert "Out-of-fold Dice over 10 cases of folds 0, 1 (2-fold cross-validation)" in proc.stdout


def test_a_rerun_skips_finished_folds_and_a_single_run_is_refused(
  cross_validation_workdir, tmp_path
):
  w = tmp_path / "cv"
  shutil.copytree(cross_validation_workdir[0], w)
  before = (w / "fold_0" / "results.json").read_text()
  proc = run_cli(w, *CROSS_VALIDATION_ARGS)
  assert proc.stderr.count("holds it finished, not retrained") == 2
  assert (w / "fold_0" / "results.json").read_text() == before
  single = run_cli(w, "--config.train.steps=2", check=False)
  assert single.returncode != 0
  assert f"{w} holds a cross-validation" in single.stderr.strip().splitlines()[-1]


def test_fewer_cases_than_folds_is_one_line(tmp_path):
  proc = run_cli(tmp_path / "cv", "--config.data.num_folds=20", "--folds=all", check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == "error: 10 cases cannot be split into 20 folds"


def test_parse_folds():
  assert workdir_lib.parse_folds("all", 3) == [0, 1, 2]
  assert workdir_lib.parse_folds("2,0,2", 3) == [0, 2]
  for bad in ("3", "-1", "x", ""):
    with pytest.raises(ConfigError, match="--folds"):
      workdir_lib.parse_folds(bad, 3)


def test_compare_over_folds_pairs_every_out_of_fold_case(cross_validation_workdir, tmp_path):
  """ResFuse's cross-validation is reused from the fixture; ResUNet's two folds train."""
  shutil.copytree(cross_validation_workdir[0], tmp_path / "resfuse")
  cmd = [
    sys.executable, "-m", "resfuse_jax.compare", "--config=configs/phantom.py:smoke",
    "--models=resfuse,resunet", f"--workdir={tmp_path}", *CROSS_VALIDATION_ARGS,
  ]  # fmt: skip
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "finished cross-validation found, not retrained" in proc.stderr
  c = json.loads((tmp_path / "comparison.json").read_text())
  assert c["folds"] == [0, 1] and c["cases"] == 10 and c["fold"] == "out-of-fold"
  resunet = c["models"][1]
  assert (
    resunet["model"] == "resunet" and (tmp_path / "resunet" / "fold_1" / "results.json").exists()
  )
  pooled = {m: metrics.read_csv(tmp_path / m / "metrics.csv") for m in ("resfuse", "resunet")}
  assert [r["case"] for r in pooled["resunet"]] != [] and len(pooled["resunet"]) == 10
  mean = sum(r["dice_WT"] for r in pooled["resunet"]) / 10
  assert resunet["dice"]["WT"]["mean"] == pytest.approx(mean)
  assert set(resunet["fold_dice"][0]) == {"0", "1"}  # one seed, two folds
  assert "10 out-of-fold cases of folds 0, 1 of 2" in (tmp_path / "comparison.md").read_text()
