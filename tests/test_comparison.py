"""The compare CLI: trains two tiny models, writes comparison.json/.md with every column."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from resfuse_jax import comparison
from resfuse_jax.errors import ConfigError

MODELS = ["resfuse", "resunet"]
REGIONS = ["WT", "TC", "ET"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("compare")
  cmd = [
    sys.executable,
    "-m",
    "resfuse_jax.compare",
    "--config=configs/phantom.py:smoke",
    f"--models={','.join(MODELS)}",
    f"--workdir={workdir}",
    "--config.train.steps=2",
    "--config.eval.every_steps=2",
    "--config.eval.max_cases=1",  # the evaluate command then scores more cases than training
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_compare_writes_json_with_every_column(compared):
  workdir, _ = compared
  c = json.loads((workdir / "comparison.json").read_text())
  assert c["dataset"] == "phantom" and c["steps"] == 2 and c["reference"] == "resfuse"
  assert c["regions"] == REGIONS and c["cases"] == 1
  assert [e["model"] for e in c["models"]] == MODELS
  for e in c["models"]:
    assert e["params"] > 0 and e["train_flops_per_step"] > 1e6
    for metric in ("dice", "recall"):
      assert set(e[metric]) == {*REGIONS, "mean"}
      for stat in e[metric].values():
        assert 0 <= stat["mean"] <= 1 and stat["std"] >= 0
      for region in REGIONS:
        test = e["paired_vs_reference"][metric][region]
        assert 0 <= test["p_value"] <= 1 and test["test"] == "wilcoxon signed-rank"
  resfuse, resunet = c["models"]
  assert resfuse["params"] > resunet["params"]  # the fusion convolutions
  assert resfuse["train_flops_per_step"] > resunet["train_flops_per_step"]  # two branches
  assert resfuse["paired_vs_reference"]["dice"]["WT"] == {
    "mean_diff": 0.0,
    "p_value": 1.0,
    "test": "wilcoxon signed-rank",
  }
  # Every model ran with the command line's overrides.
  for model in MODELS:
    config = json.loads((workdir / model / "config.json").read_text())
    assert config["train"]["steps"] == 2 and config["model"]["variant"] == model


def test_compare_writes_the_papers_table_layout(compared):
  workdir, proc = compared
  md = (workdir / "comparison.md").read_text()
  header = md.splitlines()[0]
  for column in ["Params", "GFLOP/step", "DSC WT", "DSC TC", "DSC EN", "DSC Mean", "Recall EN"]:
    assert column in header
  rows = [line for line in md.splitlines() if line.startswith("| res")]
  # Table 2, the lesion-wise table (before and after each model's post-processing), Δ table
  names = ["resfuse", "resunet", "resfuse", "resunet", "resunet"]
  assert [r.split("|")[1].strip() for r in rows] == names
  assert "±" in rows[0] and "ΔDSC EN" in md
  assert "| lesion-wise DSC WT (%)" in md and "post-processed lesion-wise DSC EN (%)" in md
  assert md in proc.stdout


def test_rerunning_reuses_finished_runs(compared):
  workdir, _ = compared
  stamp = (workdir / "resunet" / "results.json").stat().st_mtime_ns
  out = comparison.compare(
    f"{ROOT / 'configs' / 'phantom.py'}:smoke",
    MODELS,
    workdir,
    {"train.steps": 2, "eval.every_steps": 2, "eval.max_cases": 1},
    "resfuse",
  )
  assert (workdir / "resunet" / "results.json").stat().st_mtime_ns == stamp
  assert [e["model"] for e in out["models"]] == MODELS


def test_evaluate_writes_its_own_folder_and_compare_still_reads_trainings_files(compared):
  workdir, _ = compared
  run = workdir / "resfuse"
  before = {name: (run / name).read_bytes() for name in ("results.json", "metrics.csv")}
  trained = json.loads(before["results.json"])
  cmd = [sys.executable, "-m", "resfuse_jax.evaluate", f"--workdir={run}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {name: (run / name).read_bytes() for name in before} == before  # byte-identical
  assert not (run / "report.md").exists() and not (run / "figures").exists()
  own = run / "eval-2"
  evaluated = json.loads((own / "results.json").read_text())
  splits = json.loads((run / "splits.json").read_text())
  assert evaluated["cases"] == len(splits["val"]) == 2 and trained["cases"] == 1
  assert evaluated["variant"] == "resfuse" and evaluated["tta"] is False
  assert "lesion_dice" in evaluated and "std" in evaluated
  assert (own / "metrics.csv").read_text().count("\n") == 1 + len(splits["val"])
  assert "| Methodology | DSC WT | DSC TC | DSC EN | Mean |" in (own / "report.md").read_text()
  assert sorted(p.name for p in (own / "figures").iterdir()) == [f"{c}.png" for c in splits["val"]]
  assert f"wrote {own}" in proc.stdout

  out = comparison.compare(
    f"{ROOT / 'configs' / 'phantom.py'}:smoke",
    ["resfuse"],
    workdir,
    {"train.steps": 2, "eval.every_steps": 2, "eval.max_cases": 1},
  )
  (entry,) = out["models"]
  assert out["cases"] == 1
  assert entry["dice"]["WT"]["mean"] == pytest.approx(trained["dice"]["WT"])


def test_unknown_model_is_a_config_error_listing_the_choices(tmp_path):
  with pytest.raises(ConfigError, match="unet9000.*resfuse.*a2fnet"):
    comparison.compare(f"{ROOT / 'configs' / 'phantom.py'}", ["unet9000"], tmp_path / "w")
  assert not (tmp_path / "w").exists()  # nothing written for a bad request


def test_paired_test_hand_computed():
  # Six cases all better by a distinct margin: exact two-sided Wilcoxon p = 2 / 2^6.
  t = comparison.paired_test([0.9, 0.8, 0.7, 0.95, 0.6, 0.5], [0.8, 0.6, 0.4, 0.55, 0.1, -0.1])
  assert t["p_value"] == pytest.approx(2 / 64)
  assert t["mean_diff"] == pytest.approx(0.35)
  assert comparison.paired_test([0.5, 0.6], [0.5, 0.6])["p_value"] == 1.0


def test_seed_averaging_hand_computed():
  # Two seeds x two cases, one region: per-case means over seeds are 0.4 and 0.5.
  seed0 = [{"dice_X": 0.2, "recall_X": 1.0}, {"dice_X": 0.4, "recall_X": 1.0}]
  seed1 = [{"dice_X": 0.6, "recall_X": 0.5}, {"dice_X": 0.6, "recall_X": 0.5}]
  entry = comparison.summarize("m", {"params": 7}, [seed0, seed1], ["X"], 1e9)
  dice, recall = dict(entry["dice"]["X"]), dict(entry["recall"]["X"])
  assert dice.pop("seed_means") == pytest.approx([0.3, 0.6])  # each seed's case mean
  assert recall.pop("seed_means") == pytest.approx([1.0, 0.5])
  assert dice == pytest.approx({"mean": 0.45, "std": 0.05, "seed_std": 0.15})
  assert recall == pytest.approx({"mean": 0.75, "std": 0.0, "seed_std": 0.25})
  assert comparison.seed_averaged([seed0, seed1], "dice_X") == pytest.approx([0.4, 0.5])
  md = comparison.comparison_markdown(
    {
      "regions": ["X"],
      "reference": "m",
      "models": [entry],
      "dataset": "d",
      "fold": 0,
      "cases": 2,
      "steps": 1,
      "batch_size": 1,
      "patch_size": [8, 8, 8],
      "seeds": [0, 1],
    }
  )
  assert "| m | 7 | 1.00 | 45.00 ± 5.00 | 75.00 ± 0.00 |" in md
  assert "Spread over seeds (std of the case-mean DSC, points): m X 15.00." in md
