"""compare --sweep: every model at every value of one config field, sweep.{json,md,png}."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from resfuse_jax import comparison, config_lib
from resfuse_jax.errors import ConfigError

MODELS = ["resfuse", "resunet"]
KNOB = "data.misregistration_mm"


def sweep_command(workdir):
  return [
    sys.executable,
    "-m",
    "resfuse_jax.compare",
    "--config=configs/phantom.py:smoke",
    f"--models={','.join(MODELS)}",
    f"--sweep={KNOB}=0,3",
    f"--workdir={workdir}",
    "--config.train.steps=2",
    "--config.eval.every_steps=2",
    "--config.eval.max_cases=1",
  ]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sweep")
  env = dict(os.environ)  # conftest's compilation cache: identical programs compile once
  proc = subprocess.run(sweep_command(workdir), cwd=ROOT, capture_output=True, text=True, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc, env


def test_sweep_trains_every_model_at_every_value_and_writes_the_three_files(swept):
  workdir, proc, _ = swept
  s = json.loads((workdir / "sweep.json").read_text())
  assert s["knob"] == KNOB and s["values"] == [0.0, 3.0]
  assert s["folders"] == ["default", f"{KNOB}=3"]
  assert list(s["models"]) == MODELS and s["reference"] == "resfuse"
  for folder, value in zip(s["folders"], s["values"]):
    for model in MODELS:
      config = json.loads((workdir / folder / model / "config.json").read_text())
      assert config["data"]["misregistration_mm"] == value and config["model"]["variant"] == model
  # The knob reached the data: each value trained on its own phantom (cache folder per setting).
  cache = os.environ["RESFUSE_CACHE"]
  phantoms = sorted(p.name for p in Path(cache).glob("phantom-seed0-n10-32x32x32*"))
  assert phantoms == [
    "phantom-seed0-n10-32x32x32",
    "phantom-seed0-n10-32x32x32-misregistration_mm3",
  ]
  for model in MODELS:
    for region in ["WT", "TC", "ET", "mean"]:
      points = s["models"][model]["dice"][region]
      assert len(points) == 2 and all(
        0 <= p["mean"] <= 1 and len(p["seed_means"]) == 1 for p in points
      )
  assert s["models"]["resfuse"]["paired"]["WT"][0]["p_value"] == 1.0  # itself
  norms = s["models"]["resfuse"]["fusion_weight_norms"]
  assert set(norms) == {"level0", "level1"} and all(n[0]["mean"] > 0 for n in norms.values())
  assert "fusion_weight_norms" not in s["models"]["resunet"]
  md = (workdir / "sweep.md").read_text()
  assert f"| Model | {KNOB} = 0 | {KNOB} = 3 |" in md and "## DSC EN" in md and "W_l" in md
  assert md in proc.stdout
  png = (workdir / "sweep.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  results = json.loads((workdir / "default" / "resfuse" / "results.json").read_text())
  assert results["fusion_weight_norms"] == {
    k: pytest.approx(v[0]["mean"]) for k, v in norms.items()
  }


def test_rerunning_the_sweep_reuses_every_finished_run(swept):
  workdir, _, env = swept
  s = json.loads((workdir / "sweep.json").read_text())
  stamps = {
    path: path.stat().st_mtime_ns
    for folder in s["folders"]
    for model in MODELS
    for path in [
      workdir / folder / model / "results.json",
      workdir / folder / model / "metrics.csv",
    ]
  }
  proc = subprocess.run(sweep_command(workdir), cwd=ROOT, capture_output=True, text=True, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("finished run found, not retrained") == 4
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  assert json.loads((workdir / "sweep.json").read_text()) == s


def test_sweep_values_take_the_fields_type_and_bad_sweeps_are_config_errors():
  config = config_lib.load(f"{ROOT}/configs/phantom.py:smoke")
  assert comparison.parse_sweep("data.pre_noise=0,0.05", config) == ("data.pre_noise", [0.0, 0.05])
  assert comparison.parse_sweep("train.steps=2,4", config) == ("train.steps", [2, 4])
  for text, match in [
    ("data.pre_noise", "expected <config field>="),
    ("data.no_such_knob=1,2", "has no field data.no_such_knob"),
    ("train.steps=2,2.5", "must be a int"),
    ("data.pre_noise=0,0", "repeated"),
    ("model.features=1,2", "only numbers and strings"),
  ]:
    with pytest.raises(ConfigError, match=match):
      comparison.parse_sweep(text, config)
  assert comparison.sweep_folder(KNOB, 0.0, 0.0) == "default"
  assert comparison.sweep_folder(KNOB, 2.25, 0.0) == f"{KNOB}=2.25"


def test_sweep_record_and_table_hand_built():
  def entry(model, dice, p):
    stat = {"mean": dice, "std": 0.1, "seed_std": 0.02, "seed_means": [dice - 0.02, dice + 0.02]}
    test = {"mean_diff": dice - 0.8, "p_value": p, "test": "wilcoxon signed-rank"}
    return {
      "model": model,
      "dice": {r: stat for r in ["WT", "TC", "ET", "mean"]},
      "paired_vs_reference": {"dice": {r: test for r in ["WT", "TC", "ET"]}},
    }

  def comparison_at(other_dice, p):
    return {
      "dataset": "phantom",
      "seeds": [0, 1],
      "steps": 10,
      "cases": 40,
      "regions": ["WT", "TC", "ET"],
      "reference": "resfuse",
      "models": [entry("resfuse", 0.8, 1.0), entry("resunet_early", other_dice, p)],
    }

  points = [
    {"value": 0.0, "folder": "default", "comparison": comparison_at(0.9, 0.01)},
    {"value": 4.5, "folder": f"{KNOB}=4.5", "comparison": comparison_at(0.7, 0.3)},
  ]
  s = comparison.sweep_record(KNOB, [0.0, 4.5], points)
  early = s["models"]["resunet_early"]
  assert [p["mean"] for p in early["dice"]["ET"]] == [0.9, 0.7]
  assert [t["mean_diff"] for t in early["paired"]["WT"]] == [
    pytest.approx(0.1),
    pytest.approx(-0.1),
  ]
  md = comparison.sweep_markdown(s)
  assert "| resunet_early | 90.00 ± 2.00* | 70.00 ± 2.00 |" in md  # significant at 0 only
  assert "| resfuse | 80.00 ± 2.00 | 80.00 ± 2.00 |" in md  # the reference is never starred
  assert "| resunet_early | WT | +10.00 (0.01) | -10.00 (0.3) |" in md
