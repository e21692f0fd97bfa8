"""The PyTorch reference of benchmarks/ is the same architecture as ours: what makes timing fair."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

torch = pytest.importorskip("torch")

from benchmarks import measure, suite, torch_reference  # noqa: E402
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
    return subprocess.CompletedProcess(cmd, 0, stdout='log\n{"volume_s": 1.0}\n', stderr="")

  monkeypatch.setattr(measure.subprocess, "run", fake_run)
  kw = {"model_name": "resfuse", "patch": 8, "batch": 1, "conv_impl": "xla"}
  row = measure.run_isolated("benchmarks.suite", "jax_inference", **kw)
  ((cmd, kwargs),) = calls
  assert cmd[:5] == [sys.executable, "-m", "benchmarks.suite", "--worker", "jax_inference"]
  assert cmd[5] == "--kwargs" and json.loads(cmd[6]) == kw
  assert kwargs["cwd"] == measure.ROOT and "env" not in kwargs
  assert row == {**kw, "volume_s": 1.0}


def test_a_worker_gets_its_conv_impl_in_its_config(monkeypatch, capsys):
  seen = []
  monkeypatch.setattr(suite.workloads, "jax_step", lambda config, steps: seen.append(config) or {})
  kwargs = '{"model_name": "resfuse", "patch": 8, "batch": 1, "steps": 1, "conv_impl": "xla"}'
  out = suite.main(["--worker", "jax_step", "--kwargs", kwargs])
  assert seen[0].model.conv_impl == "xla" and tuple(seen[0].data.patch_size) == (8, 8, 8)
  assert out["peak_rss_mb"] > 0 and json.loads(capsys.readouterr().out.splitlines()[-1]) == out


def test_the_runner_keeps_order_records_skips_and_failures():
  def boom():
    raise ValueError("no")

  todo = [
    measure.Measurement("a/1", lambda: {"ms": 1.0}),
    measure.Measurement("b/1", boom),
    measure.Measurement("a/2", lambda: {"ms": 2.0}, expected_s=1e9),  # over the budget
    measure.Measurement("c/1", lambda: {"ms": 3.0}),
  ]
  logged = []
  results, failed = measure.run_measurements(todo, 100.0, log=logged.append)
  assert failed and list(results) == ["a/1", "b/1", "a/2", "c/1"]
  assert results["a/1"]["ms"] == 1.0 and results["a/1"]["wall_s"] >= 0
  assert results["b/1"]["error"] == "ValueError: no" and "boom" in results["b/1"]["traceback"]
  assert results["a/2"]["skipped"].endswith("needs ~1000000000 s")
  only, failed = measure.run_measurements(todo, only=["a/"], log=logged.append)
  assert list(only) == ["a/1", "a/2"] and not failed and only["a/2"]["ms"] == 2.0
  assert len(logged) == 6 and "--- b/1" in logged[1]


def test_the_harness_times_compiles_and_analyses_a_jitted_function():
  f = jax.jit(lambda a: a @ a)
  a = jnp.ones((64, 64))
  compiled = measure.compile_jitted(f, a)
  assert compiled.flops == pytest.approx(2 * 64**3, rel=0.01)
  assert compiled.bytes_accessed >= 2 * 64 * 64 * 4 and compiled.memory_bytes > 0
  calls = []
  timing = measure.time_calls(
    lambda: calls.append(compiled.executable(a).block_until_ready()), 3, 2
  )
  assert len(calls) == 5 and len(timing.times_s) == 3 and timing.first_s > 0
  assert timing.best_s <= timing.median_s
  rates = measure.achieved(compiled, 1e-3)
  assert rates["tflops_per_s"] == pytest.approx(compiled.flops / 1e9)


def test_the_environment_names_the_code_and_the_machine():
  env = measure.environment("cmd")
  assert env["versions"]["jax"] == jax.__version__ and env["command"] == "cmd"
  assert env["backend"] == jax.default_backend() and env["devices"]
  assert env["commit"] and len(env["commit"].split("+")[0]) >= 7  # the worktree is a git checkout


def test_the_benchmarks_step_is_trainings_own(monkeypatch):
  """One place reaches training: the step the benchmarks time is the one it builds."""
  from resfuse_jax import train

  built = []
  real = train.make_step_fn
  monkeypatch.setattr(train, "make_step_fn", lambda *a, **k: built.append(k) or real(*a, **k))
  config = suite.brats_config("resunet", 16, 1)
  config.model.features = (4, 8)
  step = measure.train_step(config)
  assert built == [{"augmented": False}]
  assert step.batch["pre"].shape == (1, 16, 16, 16, 1)
  before = int(step.state.step)
  step()
  assert int(step.state.step) == before + 1


# One measurement of each kind: a JAX step (in a fresh process, with XLA's layout flag set),
# a PyTorch step, the data path, MONAI's sliding window.
GPU_CHECK_SUBSET = "variant/conv_layout=default,variant/threefry_partitionable=false,torch_step/resunet/float32,data/workers=0,volume/monai,data/resident_step"


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
  step = res["results"]["variant/conv_layout=default"]
  assert step["dtype"] == "bfloat16" and "conv='xla'" in step["plan"]  # the GPU column
  assert res["results"]["variant/threefry_partitionable=false"]["compile_s"] > 0
  assert "| variant/conv_layout=default |" in (tmp_path / "gpu.md").read_text()
  assert (tmp_path / "pytest_gpu.log").exists()  # pytest -m gpu ran (skipped without a GPU)


def test_the_gpu_check_script_installs_nothing_it_has_and_writes_its_files(tmp_path):
  """The shell script's own flow, with one cheap measurement (the kinds are a slow test)."""
  proc = run_gpu_check(tmp_path, "--only=data/workers=0,data/resident/")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "pytest -m gpu exit 0, measurements exit 0" in proc.stdout
  res = json.loads((tmp_path / "gpu.json").read_text())
  assert list(res["results"]) == ["data/workers=0", "data/resident/bfloat16"]
  host, on_device = res["results"]["data/workers=0"], res["results"]["data/resident/bfloat16"]
  assert host["crop"] == on_device["crop"] and on_device["patches_per_s"] > 0
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
    "variant/conv_layout=nchw": {"ms": 11.0},  # default missing: no layout advice
    "volume/jax/eval_batch=2": {"ms": 120.0},
    "volume/jax/eval_batch=8": {"ms": 80.0},
    "volume/jax_device/eval_batch=4": {"ms": 60.0},
    "torch_step/resfuse/bfloat16": {"ms": 12.0},
    "augmentation/resfuse/bfloat16": {"ms": 12.0, "step_patches_per_s": 166.0},
    "data/workers=16": {"patches_per_s": 300.0},
    "variant/threefry_partitionable=true": {"ms": 12.0, "compile_s": 50.0},
    "variant/threefry_partitionable=false": {"ms": 12.1, "compile_s": 20.0},  # within 2%
  }
  assert gpu_check.recommend(results) == {
    "downsample": "strided",
    "upsample": "depth_to_space",
    "compute_dtype": "bfloat16",
    "tiling": "device",
    "eval_batch_size": 4,
    "threefry_partitionable": False,
  }
  results["volume/jax/eval_batch=8"]["ms"] = 50.0
  results["variant/threefry_partitionable=false"]["ms"] = 13.0  # slower step: the step decides
  results["variant/conv_layout=default"] = {"ms": 10.5}
  advice = gpu_check.recommend(results)
  assert (advice["tiling"], advice["eval_batch_size"]) == ("host", 8)
  assert advice["threefry_partitionable"] is True and advice["conv_layout"] == "nhwc"
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
  (tmp_path / "t.json").write_text(json.dumps(synthetic_results()))
  monkeypatch.setattr(suite, "RESULTS", tmp_path)
  header = {"command": "only inference", "date": "today", "versions": {"jax": "x"}}
  merged = suite.finish("t", {"inference": res["inference"]}, header, only="inference")
  on_disk = json.loads((tmp_path / "t.json").read_text())
  assert on_disk == merged and on_disk["train_step"] == synthetic_results()["train_step"]
  assert on_disk["sections"]["inference"]["command"] == "only inference"
  assert on_disk["ratios"]["monai_over_onnxruntime_inference"] == pytest.approx(3.0)
  assert "Measured apart from the rest: `only inference`" in (tmp_path / "t.md").read_text()


def test_the_suites_results_render_from_the_recorded_file():
  """The recorded numbers are read, not rewritten: today's code renders the same table rows."""
  recorded = json.loads((ROOT / "benchmarks" / "results" / "cpu.json").read_text())
  text = suite.markdown(recorded)
  kept = (ROOT / "benchmarks" / "results" / "cpu.md").read_text()
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert rows and all(line in kept for line in rows)
  assert suite.ratios(recorded) == pytest.approx(recorded["ratios"])


def test_the_suites_measurements_group_into_its_sections(tmp_path):
  ns = argparse.Namespace(
    batch=2, patch=32, steps=1, before=True, scale_patches="16", scale_batches="1", cases=1
  )
  names = [m.name for m in suite.measurements(ns, str(tmp_path))]
  assert names[0] == "matmul" and names[-2:] == ["pipeline", "augmentation"]
  assert "train_step/jax/resfuse/xla" in names and "train_step/jax/resunet/xla" not in names
  assert [n for n in names if n.startswith("scaling/")] == [
    "scaling/jax/16/2", "scaling/jax/16/1", "scaling/torch/16/2", "scaling/torch/16/1",
  ]  # fmt: skip
  fake = {"step_times_s": [2.0], "params": 1, "peak_rss_mb": 1.0}
  results = {
    "train_step/jax/resfuse/auto": {"model_name": "resfuse", "patch": 2, "batch": 1, **fake},
    "scaling/torch/16/1": {"model_name": "resfuse", "patch": 16, "batch": 1, **fake},
    "pipeline": {"patches_per_s_0_workers": 3.0, "wall_s": 1.0},
  }
  sec = suite.sections(results)
  assert sec["train_step"][0]["framework"] == "jax" and sec["train_step"][0]["step_s"] == 2.0
  assert (
    sec["scaling"][0]["framework"] == "torch" and sec["scaling"][0]["voxels_per_s"] == 16**3 / 2
  )
  assert sec["pipeline"] == {"patches_per_s_0_workers": 3.0}


def test_the_onnxruntime_workers_run_at_toy_size(monkeypatch, tmp_path):
  pytest.importorskip("onnxruntime")
  monkeypatch.setattr(suite, "VOLUME", (20, 18, 16))
  path = str(tmp_path / "model.onnx")
  exported = suite.onnx_export("resunet", 16, 2, path)
  assert exported["bytes"] > 0
  row = suite.onnxruntime_inference("resunet", 16, 2, path)
  assert row["ms"] == pytest.approx(1e3 * row["volume_s"])
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


def test_the_gpu_checks_step_profile_runs_at_toy_sizes_on_the_cpu(tmp_path):
  """Issue 27's profile of the step: device time per op kind, written into gpu.json."""
  cmd = [sys.executable, "-m", "benchmarks.gpu_check", f"--out={tmp_path}", "--tiny"]
  proc = subprocess.run(
    [*cmd, "--only=profile/"], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads((tmp_path / "gpu.json").read_text())
  assert list(res["results"]) == ["profile/resfuse/bfloat16"]
  profile = res["results"]["profile/resfuse/bfloat16"]
  assert profile["ops"] > 0 and profile["by_kind_ms"]["convolution"] > 0
  assert sum(profile["by_kind_share"].values()) == pytest.approx(1.0)
  assert profile["top_ops_ms"] and profile["ops_ms"] > 0


def test_the_openvino_row_and_the_agreement_with_jax_at_toy_size(monkeypatch, tmp_path):
  """The suite's OpenVINO worker on the exported graph, and each backend's agreement with
  JAX computed from the probabilities the workers leave (one model, one initialisation)."""
  from resfuse_jax.inference import openvino_runtime

  if not openvino_runtime.available():  # not importorskip: that imports it with its telemetry
    pytest.skip("openvino is not installed")
  monkeypatch.setattr(suite, "VOLUME", (20, 18, 16))
  path = str(tmp_path / "model.onnx")
  suite.onnx_export("resunet", 16, 2, path)
  outs = {"jax": str(tmp_path / "jax.npy"), "ov": str(tmp_path / "ov.npy")}
  results = {  # as measure.run_isolated returns them: the worker's kwargs, then its record
    "inference/jax": {"out": outs["jax"], **suite.jax_inference("resunet", 16, 2, out=outs["jax"])},
    "inference/openvino_f32": {
      "out": outs["ov"],
      **suite.openvino_inference("resunet", 16, 2, path, out=outs["ov"]),
    },
  }
  row = results["inference/openvino_f32"]
  assert row["out_shape"] == [20, 18, 16, 3] and row["precision"] == "f32"
  suite.agreement(results)
  assert row["max_abs_prob_diff_vs_jax"] < 1e-4 and row["labels_equal_vs_jax"] > 0.999
  assert not list(tmp_path.glob("*.npy"))  # the probabilities are removed once compared
  planted = {
    "inference/jax": {"out": str(tmp_path / "a.npy")},
    "inference/openvino_f32": {"out": str(tmp_path / "b.npy")},
  }
  np.save(tmp_path / "a.npy", np.full((4, 4, 4, 1), 0.4, np.float32))
  np.save(tmp_path / "b.npy", np.full((4, 4, 4, 1), 0.6, np.float32))
  suite.agreement(planted)
  assert planted["inference/openvino_f32"]["labels_equal_vs_jax"] == 0.0
  assert planted["inference/openvino_f32"]["max_abs_prob_diff_vs_jax"] == pytest.approx(0.2)


def test_a_cpu_without_bf16_records_why_the_openvino_bf16_row_is_missing(monkeypatch, tmp_path):
  """The suite leaves the bf16 row out on a CPU without BF16, and says so in its results."""
  from resfuse_jax.inference import openvino_runtime

  no_bf16 = {"name": "Test CPU", "capabilities": ["FP32", "INT8"], "bf16": False}
  monkeypatch.setattr(openvino_runtime, "available", lambda: True)
  monkeypatch.setattr(openvino_runtime, "cpu", lambda: no_bf16)
  assert suite.openvino_precisions() == ["f32"]
  line = (
    "openvino_bf16: not measured: this CPU (Test CPU) has no BF16 "
    "(OpenVINO OPTIMIZATION_CAPABILITIES: [FP32, INT8])"
  )
  assert [f"{k}: {v}" for k, v in suite.skipped().items()] == [line]
  monkeypatch.setattr(suite, "RESULTS", tmp_path)
  res = suite.finish("t", synthetic_results(), {})
  assert json.loads((tmp_path / "t.json").read_text())["skipped"] == res["skipped"]
  assert f"- {line}" in (tmp_path / "t.md").read_text().splitlines()
  monkeypatch.setattr(openvino_runtime, "cpu", lambda: {**no_bf16, "bf16": True})
  assert suite.openvino_precisions() == ["f32", "bf16"] and suite.skipped() == {}
  assert "not measured" not in suite.markdown({**res, "skipped": suite.skipped()})
