"""The PyTorch reference of benchmarks/ is the same architecture as ours: what makes timing fair."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT

torch = pytest.importorskip("torch")

from benchmarks import suite, torch_reference  # noqa: E402
from resfuse_jax import config_lib, models  # noqa: E402


@pytest.mark.parametrize("name", ["resfuse", "resunet"])
@pytest.mark.parametrize("features", [(4, 8), (16, 32, 64, 128, 256)])
def test_torch_reference_has_our_parameter_count_and_output_shape(name, features):
  cfg = config_lib.base_config(name).model
  cfg.features = features
  model = models.build(cfg, 3)
  x = jnp.zeros((1, 16, 16, 16, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), x, x)["params"]
  ref = torch_reference.build(name, features, 3)
  assert torch_reference.count_params(ref) == models.count_params(params)
  if len(features) == 2:
    t = torch.zeros(1, 1, 16, 16, 16)
    assert tuple(ref(t, t).shape) == (1, 3, 16, 16, 16)


def test_torch_reference_train_step_lowers_the_loss():
  torch.manual_seed(0)
  model = torch_reference.build("resfuse", (4, 8), 3)
  step = torch_reference.make_train_step(model, ((1, 2, 3), (1, 3), (3,)), lr=1e-2)
  post = torch.randn(2, 1, 16, 16, 16)
  label = (post[:, 0] > 1.0).long() * 3
  losses = [float(step(post * 0.5, post, label)) for _ in range(8)]
  assert losses[-1] < losses[0]


def synthetic_results(torch_params=100):
  def row(framework, model, step_s, impl=None, **extra):
    r = {"framework": framework, "model_name": model, "patch": 8, "batch": 2, "params": 100}
    r.update(step_times_s=[step_s, step_s], peak_rss_mb=1000.0, **extra)
    if impl:
      r["conv_impl"] = impl
    return suite.step_row(r)

  rows = [
    row("jax", "resfuse", 2.0, "auto", flops=4e9),
    row("jax", "resfuse", 6.0, "xla", flops=4e9),
    row("torch", "resfuse", 1.0),
    row("jax", "resunet", 1.6, "auto", flops=3e9),
    {**row("torch", "resunet", 0.8), "params": torch_params},
  ]
  return {
    "name": "t",
    "device": "cpu",
    "cpu_count": 2,
    "versions": {"jax": "x", "torch": "y"},
    "command": "c",
    "date": "d",
    "matmul_flops_per_s": 4e9,
    "train_step": rows,
    "scaling": [],
    "inference": [
      {"framework": "jax", "volume_s": 10.0, "warmup_s": 1.0, "peak_rss_mb": 1.0},
      {"framework": "monai", "volume_s": 15.0, "warmup_s": 1.0, "peak_rss_mb": 1.0},
    ],
    "pipeline": {"patches_per_s_0_workers": 3.0, "patches_per_s_2_workers": 1.0},
  }


def test_suite_ratios_are_the_issues_targets():
  r = suite.ratios(synthetic_results())
  assert r["resfuse_torch_over_jax_step"] == pytest.approx(0.5)
  assert r["resfuse_over_resunet_step_jax"] == pytest.approx(2.0 / 1.6)
  assert r["monai_over_jax_inference"] == pytest.approx(1.5)
  assert r["resfuse_flops_fraction_of_matmul"] == pytest.approx(0.5)  # 4e9 / 2 s / 4e9
  assert r["pipeline_over_step_consumption"] == pytest.approx(3.0 / (2 / 2.0))
  assert r["resfuse_xla_conv_over_auto_step"] == pytest.approx(3.0)
  table = suite.markdown({**synthetic_results(), "ratios": r})
  assert "| resfuse | jax | xla | 8³ | 2 | 100 | 6.00 |" in table


def test_suite_refuses_to_compare_models_of_different_size():
  with pytest.raises(AssertionError, match="resunet: 100 parameters in JAX, 99 in torch"):
    suite.ratios(synthetic_results(torch_params=99))


def test_brats_config_carries_the_conv_impl_not_the_environment(monkeypatch):
  monkeypatch.setenv("RESFUSE_CONV_IMPL", "planes")
  c = suite.brats_config("resfuse", 32, 1, "xla")
  assert (c.model.name, c.model.conv_impl) == ("resfuse", "xla")
  assert tuple(c.data.patch_size) == (32, 32, 32) and c.train.batch_size == 1
  assert suite.brats_config("resunet", 32, 1).model.conv_impl == "planes"  # the config's default


def test_workers_run_as_modules_from_the_repository_root(monkeypatch):
  calls = []

  def fake_run(cmd, **kwargs):
    calls.append((cmd, kwargs))
    return suite.subprocess.CompletedProcess(cmd, 0, stdout='{"volume_s": 1.0}\n', stderr="")

  monkeypatch.setattr(suite.subprocess, "run", fake_run)
  row = suite.run_worker("jax_inference", "xla", model_name="resfuse", patch=8, batch=1)
  ((cmd, kwargs),) = calls
  assert cmd[:5] == [suite.sys.executable, "-m", "benchmarks.suite", "--worker", "jax_inference"]
  assert cmd[-2:] == ["--conv-impl", "xla"]
  assert kwargs["cwd"] == suite.ROOT and "env" not in kwargs
  assert row == {
    "model_name": "resfuse",
    "patch": 8,
    "batch": 1,
    "conv_impl": "xla",
    "volume_s": 1.0,
  }
  assert "--conv-impl" not in suite.worker_command("torch_step", model_name="resfuse")


def test_a_worker_gets_its_conv_impl_as_an_argument(monkeypatch, capsys):
  monkeypatch.setitem(suite.WORKERS, "echo", lambda **kwargs: kwargs)
  out = suite.main(["--worker", "echo", "--kwargs", '{"patch": 8}', "--conv-impl", "xla"])
  assert out == {"patch": 8, "conv_impl": "xla"}
  assert '"conv_impl": "xla"' in capsys.readouterr().out


# One measurement of each kind: a JAX step (in a fresh process, with XLA's layout flag set),
# a PyTorch step, the data path, MONAI's sliding window.
GPU_CHECK_SUBSET = "variant/conv_layout=nhwc,torch_step/resunet/float32,data/workers=0,volume/monai"


def run_gpu_check(out, *flags):
  env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
  cmd = ["bash", "benchmarks/gpu_check.sh", str(out), "--tiny", *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_kinds_of_measurement_at_toy_sizes(tmp_path):
  """One of each kind (JAX step, PyTorch step, data path, MONAI, a fresh-process layout flag)."""
  proc = run_gpu_check(tmp_path, f"--only={GPU_CHECK_SUBSET}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads((tmp_path / "gpu.json").read_text())
  assert set(res["results"]) == set(
    GPU_CHECK_SUBSET.replace("volume/monai", "volume/monai/eval_batch=4").split(",")
  )
  for name, r in res["results"].items():
    assert "error" not in r and ("ms" in r or "patches_per_s" in r), (name, r)
  step = res["results"]["variant/conv_layout=nhwc"]
  assert step["dtype"] == "bfloat16" and "conv='xla'" in step["plan"]  # the GPU column
  assert "| variant/conv_layout=nhwc |" in (tmp_path / "gpu.md").read_text()
  assert (tmp_path / "pytest_gpu.log").exists()  # pytest -m gpu ran (skipped without a GPU)


def test_the_gpu_check_script_installs_nothing_it_has_and_writes_its_files(tmp_path):
  """The shell script's own flow, with one cheap measurement (the kinds are a slow test)."""
  proc = run_gpu_check(tmp_path, "--only=data/workers=0")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "pytest -m gpu exit 0, measurements exit 0" in proc.stdout
  res = json.loads((tmp_path / "gpu.json").read_text())
  assert list(res["results"]) == ["data/workers=0"] and res["results"]["data/workers=0"]["crop"]
  assert (tmp_path / "gpu.md").exists() and (tmp_path / "pytest_gpu.log").exists()


@pytest.mark.slow
def test_the_whole_gpu_check_runs_at_toy_sizes(tmp_path):
  proc = run_gpu_check(tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads((tmp_path / "gpu.json").read_text())
  assert not [n for n, r in res["results"].items() if "error" in r or "skipped" in r]


def test_the_gpu_check_recommends_only_what_it_measured():
  from benchmarks import gpu_check

  results = {
    "step/resfuse/bfloat16": {"ms": 10.0},
    "step/resfuse/float32": {"ms": 25.0},
    "variant/downsample=strided": {"ms": 9.0},
    "variant/upsample=transpose": {"ms": 30.0},
    "variant/conv_layout=nhwc": {"ms": 11.0},  # nchw missing: no layout advice
    "volume/jax/eval_batch=2": {"ms": 120.0},
    "volume/jax/eval_batch=8": {"ms": 80.0},
    "torch_step/resfuse/bfloat16": {"ms": 12.0},
    "augmentation/resfuse/bfloat16": {"ms": 12.0, "step_patches_per_s": 166.0},
    "data/workers=16": {"patches_per_s": 300.0},
  }
  assert gpu_check.recommend(results) == {
    "downsample": "strided",
    "upsample": "depth_to_space",
    "compute_dtype": "bfloat16",
    "eval_batch_size": 8,
  }
  assert gpu_check.goals(results) == {
    "resfuse bf16 step <= 10 ms": True,
    "resfuse bf16 step <= PyTorch's": True,
    "volume <= 100 ms": True,  # the fastest whole-volume path counts
    "data path >= 2x step consumption": False,
  }


def test_onnxruntime_rows_give_their_ratios_and_merge_alone(monkeypatch, tmp_path):
  res = synthetic_results()
  res["inference"].insert(
    1, {"framework": "onnxruntime", "volume_s": 5.0, "warmup_s": 1.0, "peak_rss_mb": 0.5}
  )
  r = suite.ratios(res)
  assert r["monai_over_onnxruntime_inference"] == pytest.approx(3.0)
  assert r["onnxruntime_over_jax_inference"] == pytest.approx(2.0)
  assert r["peak_rss_monai_over_onnxruntime"] == pytest.approx(2.0)
  results = tmp_path / "benchmarks" / "results"
  results.mkdir(parents=True)
  (results / "t.json").write_text(json.dumps(synthetic_results()))
  monkeypatch.setattr(suite, "ROOT", tmp_path)
  header = {"command": "only inference", "date": "today", "versions": {"jax": "x"}}
  merged = suite.merge_section("t", "inference", res["inference"], header)
  on_disk = json.loads((results / "t.json").read_text())
  assert on_disk == merged and on_disk["train_step"] == synthetic_results()["train_step"]
  assert on_disk["sections"]["inference"]["command"] == "only inference"
  assert on_disk["ratios"]["monai_over_onnxruntime_inference"] == pytest.approx(3.0)
  assert "Measured apart from the rest: `only inference`" in (results / "t.md").read_text()


def test_the_onnxruntime_workers_run_at_toy_size(monkeypatch, tmp_path):
  pytest.importorskip("onnxruntime")
  monkeypatch.setattr(suite, "VOLUME", (20, 18, 16))
  path = str(tmp_path / "model.onnx")
  exported = suite.onnx_export("resunet", 16, 2, path)
  assert exported["bytes"] > 0
  row = suite.onnxruntime_inference("resunet", 16, 2, path)
  assert row["out_shape"] == [20, 18, 16, 3] and row["tiles_per_run"] == 1
  assert row["volume_s"] > 0


def test_robustness_cases_groups_each_cases_dice_change_by_how_far_it_moved(tmp_path):
  from benchmarks import robustness_cases

  root = tmp_path / "phantom"
  root.mkdir()
  moved = {f"case{i}": float(i) for i in range(6)}  # case i moved i mm along x
  (root / "acquisition.json").write_text(
    json.dumps({c: {"translation_mm": [m, 0.0, 0.0]} for c, m in moved.items()})
  )
  for folder, loss in (("default", 0.0), ("data.misregistration_mm=6", 0.1)):
    for seed, jitter in ((0, 0.01), (1, -0.01)):  # the seeds average out
      run = tmp_path / "W" / folder / "resfuse" / f"seed{seed}"
      run.mkdir(parents=True)
      (run / "config.json").write_text(json.dumps({"data": {"root": str(root)}}))
      rows = ["case,dice_WT"] + [f"{c},{0.9 - loss * m / 5 + jitter}" for c, m in moved.items()]
      (run / "metrics.csv").write_text("\n".join(rows) + "\n")
  lines = robustness_cases.table(tmp_path / "W", "data.misregistration_mm=6", ["WT"])
  cells = [c.strip() for c in lines[2].split("|")[1:-1]]
  # thirds {0,1}, {2,3}, {4,5} mm lose 0.1 * m / 5 on average: 1, 5 and 9 points
  assert cells == [
    "resfuse", "WT", "-1.00 (0.0–1.0 mm)", "-5.00 (2.0–3.0 mm)", "-9.00 (4.0–5.0 mm)", "-1.00",
  ]  # fmt: skip
