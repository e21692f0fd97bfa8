"""Issue 31: OpenVINO on the exported graph, chosen by ``auto``; bf16 behind an agreement check.

Every registered model's f32 agreement with JAX is in test_onnx_export.py (beside
onnxruntime's, on the same exports).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, smoke_config

pytest.importorskip("onnx")

from resfuse_jax import data, files  # noqa: E402
from resfuse_jax.errors import CheckpointError, ConfigError  # noqa: E402
from resfuse_jax.inference import (  # noqa: E402
  integrity,
  onnx_runtime,
  openvino_runtime,
  precision,
  predictor,
  runtimes,
)
from resfuse_jax.inference.predictor import Predictor  # noqa: E402
from resfuse_jax.serving import agreement, exporting, onnx_cache  # noqa: E402

if not openvino_runtime.available():  # importorskip would import it with its telemetry
  pytest.skip("openvino is not installed", allow_module_level=True)

AUTO = "auto on CPU: the first installed of openvino, onnxruntime"


@pytest.fixture
def hidden(monkeypatch):
  """Names added to the returned set are not installed, as far as the package can tell."""
  names = set()
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a, **k: None if name in names else real(name, *a, **k),
  )
  return names


class Graphs:
  """A `runtimes.GraphSource` that says whether it could build (it builds nothing)."""

  def __init__(self, missing=None):
    self.why = missing

  def missing(self):
    return self.why


def test_auto_takes_openvino_then_onnxruntime_then_jax_on_a_cpu(hidden, tmp_path, monkeypatch):
  export, work = tmp_path / "E", tmp_path / "W"
  for folder in (export, work):
    folder.mkdir()
  (export / "export.json").write_text("{}")
  (export / onnx_runtime.FILE).write_bytes(b"")
  assert runtimes.choose("auto", export) == ("openvino", AUTO)
  assert runtimes.choose("auto", work, Graphs()) == ("openvino", AUTO)  # a graph gets built
  backend, why = runtimes.choose("auto", work)  # no builder handed in
  assert backend == "jax" and "a training workdir, not an export" in why
  backend, why = runtimes.choose("auto", work, Graphs("the onnx package: pip install X"))
  assert backend == "jax" and "building its model.onnx needs the onnx package" in why
  hidden.add("openvino")
  assert runtimes.choose("auto", export) == ("onnxruntime", AUTO)
  with pytest.raises(ConfigError, match=r"openvino needs openvino: pip install 'resfuse-jax\["):
    runtimes.choose("openvino", export)
  hidden.add("onnxruntime")
  backend, why = runtimes.choose("auto", export)
  assert backend == "jax" and "neither openvino nor onnxruntime is installed" in why
  hidden.clear()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert runtimes.choose("auto", export) == ("jax", "auto: JAX runs on a GPU")
  assert runtimes.choose("openvino", export) == ("openvino", "")  # named: honoured
  with pytest.raises(ConfigError, match="--backend must be one of auto, jax, openvino"):
    runtimes.choose("tensorrt", export)


def test_openvino_is_imported_without_its_telemetry_and_keeps_absl_logging(tmp_path):
  """openvino's converter writes ~/intel, forks a sender and drops absl's log handler."""
  code = (
    "import logging, sys; from absl import logging as absl_logging\n"
    "handler = absl_logging.get_absl_handler(); logging.getLogger().addHandler(handler)\n"
    "from resfuse_jax.inference import openvino_runtime as o\n"
    "print(o.version(), o.cpu()['name'])\n"
    "assert sys.modules['openvino_telemetry'] is None, 'telemetry imported'\n"
    "assert handler in logging.getLogger().handlers, 'absl handler dropped'\n"
  )
  env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []  # no consent or client-ID files in the home folder


def test_bad_knobs_are_one_line():
  with pytest.raises(ConfigError, match="--precision must be one of f32, bf16; got 'fp16'"):
    runtimes.WindowSettings("fp16")
  with pytest.raises(ConfigError, match="--streams must be >= 0"):
    runtimes.WindowSettings(streams=-1)
  with pytest.raises(ConfigError, match="--windows_per_call must be >= 0"):
    runtimes.WindowSettings(windows_per_call=-2)


# ----- a random model and a workdir naming 3 validation cases of the smoke phantom ---------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(a `Predictor` with random parameters, a workdir holding only config and splits)."""
  from test_onnx_export import random_model

  config, _, params, _ = random_model("resfuse")
  work = tmp_path_factory.mktemp("source")
  files.write_json(work / "config.json", config.to_dict())
  ids = sorted(c.case_id for c in data.find_cases(data.confined_to_user_cache(config.data)))
  splits = {"fold": 0, "num_folds": 3, "train": ids[3:], "val": ids[:3]}
  files.write_json(work / "splits.json", splits)
  return Predictor(config, params, 0), work


def planted(shift: float):
  """A window factory for `agreement.bf16_agreement`: OpenVINO at f32, and as "bf16" the
  same probabilities moved by ``shift`` (0: a bf16 that agrees perfectly)."""
  real = openvino_runtime.OpenVinoWindow

  def window(graph, sha256, precision_, regions):
    f32 = real(graph, sha256, "f32", regions)
    if precision_ == "f32":
      return f32
    return lambda tiles: np.clip(f32(tiles) + shift, 0.0, 1.0)

  return window


def export_with(source, out, shift, monkeypatch):
  """``write_export`` on a CPU said to have BF16, its bf16 window planted."""
  cpu = {"name": "Exporting CPU", "capabilities": [], "bf16": True}
  with monkeypatch.context() as m:
    m.setattr(openvino_runtime, "cpu", lambda: cpu)
    m.setattr(openvino_runtime, "OpenVinoWindow", planted(shift))
    return exporting.write_export(source[0], out, "yes", source[1], agreement_cases=2)


def bf16(path, monkeypatch, cpu="Predicting CPU"):
  monkeypatch.setattr(
    openvino_runtime, "cpu", lambda: {"name": cpu, "capabilities": [], "bf16": True}
  )
  return Predictor.load(path, None, "openvino", settings=runtimes.WindowSettings("bf16"))


def test_export_records_agreement_numbers_only_and_bf16_is_allowed_with_a_note(
  source, tmp_path, monkeypatch
):
  out = export_with(source, tmp_path / "E", 0.0, monkeypatch)
  meta = integrity.verify_export(out)  # the record is sealed with the rest
  record = meta[precision.KEY]
  assert record["measured"] and record["cases"] == 2 and record["cpu"] == "Exporting CPU"
  assert record["changed_label_share"] == 0.0 and record["max_abs_prob_change"] == 0.0
  assert set(record["dice_change"]) == {"WT", "TC", "ET"}
  assert set(record["dice_change"].values()) == {0.0}
  assert record["openvino"] == openvino_runtime.version() and record["voxels"] > 0
  val = json.loads((source[1] / "splits.json").read_text())["val"]
  assert not any(c in json.dumps(record) for c in val)  # numbers only: no case is named
  loaded = bf16(out, monkeypatch)
  assert loaded.backend == "openvino bf16" and "bf16 allowed" in loaded.backend_note
  assert "measured on Exporting CPU, this CPU is Predicting CPU" in loaded.backend_note
  assert "measured on" not in bf16(out, monkeypatch, "Exporting CPU").backend_note


def test_bf16_is_refused_with_the_numbers_of_a_planted_disagreement(source, tmp_path, monkeypatch):
  out = export_with(source, tmp_path / "E", 0.3, monkeypatch)
  record = integrity.verify_export(out)[precision.KEY]
  assert record["changed_label_share"] > precision.MAX_CHANGED_SHARE
  assert abs(record["max_abs_prob_change"] - 0.3) < 1e-3
  with pytest.raises(ConfigError, match=r"refused: at export, on 2 validation case\(s\), bf16 "
                     r"changed the label of \d+\.\d{3}% of voxels \(bound 0\.1%\)"):  # fmt: skip
    bf16(out, monkeypatch)
  proc = subprocess.run(  # the command: one line, the same numbers
    [sys.executable, "-m", "resfuse_jax.predict", f"--model={out}", "--precision=bf16",
     "--pre=a.nii.gz", "--post=b.nii.gz", f"--out={tmp_path / 's.nii.gz'}"],
    cwd=ROOT, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: --precision=bf16 with {out} refused") and "% of voxels" in last


def test_a_resealed_dice_change_past_its_bound_is_refused(source, tmp_path, monkeypatch):
  out = export_with(source, tmp_path / "E", 0.0, monkeypatch)
  path = out / integrity.EXPORT_JSON
  meta = json.loads(path.read_text())
  meta[precision.KEY]["dice_change"]["ET"] = -0.006
  path.write_text(json.dumps(meta))  # not resealed: the record's own digest tells
  with pytest.raises(CheckpointError, match="export.json does not match the SHA-256 recorded in"):
    bf16(out, monkeypatch)
  path.write_text(json.dumps(integrity.seal(meta, out)))
  with pytest.raises(ConfigError, match=r"bf16 moved ET's Dice by -0\.0060 \(bound 0\.005\)"):
    bf16(out, monkeypatch)
  assert Predictor.load(out, None, "openvino").backend == "openvino"  # f32 is unaffected


def test_what_is_recorded_when_bf16_cannot_be_measured(source, hidden, tmp_path, monkeypatch):
  p, work = source
  graph = tmp_path / onnx_runtime.FILE
  sha = exporting.write_onnx(tmp_path, p, "yes", {})["sha256"]
  monkeypatch.setattr(
    openvino_runtime, "cpu", lambda: {"name": "X", "capabilities": ["FP32"], "bf16": False}
  )
  reasons = {
    "the exporting CPU has no BF16 (OpenVINO lists FP32)": (work, 2),
    "export --agreement_cases=0": (work, 0),
    "no source workdir": (None, 2),
  }
  for reason, (where, cases) in reasons.items():
    window = None if "BF16" in reason else planted(0.0)
    record = agreement.bf16_agreement(p, graph, sha, where, cases, window)
    assert not record["measured"] and reason in record["reason"] and record["cpu"] == "X"
  splits = json.loads((work / "splits.json").read_text())
  moved = tmp_path / "moved"
  shutil.copytree(work, moved)
  files.write_json(moved / "splits.json", {**splits, "val": ["BraTS-GLI-99999-000"]})
  record = agreement.bf16_agreement(p, graph, sha, moved, 2, planted(0.0))
  assert "BraTS-GLI-99999-000 of" in record["reason"] and "not under data.root" in record["reason"]
  hidden.add("openvino")
  record = agreement.bf16_agreement(p, graph, sha, work, 2)
  assert not record["measured"] and "openvino was not installed" in record["reason"]
  meta = {precision.KEY: record}
  with pytest.raises(ConfigError, match="bf16 not measured: openvino was not installed"):
    precision.check_bf16(meta, "E", {"name": "X"})
  with pytest.raises(ConfigError, match="records no bf16 agreement check"):
    precision.check_bf16({}, "E", {"name": "X"})


def test_bf16_runs_only_on_openvino_and_only_from_an_export(tmp_path):
  settings = runtimes.WindowSettings("bf16")
  with pytest.raises(ConfigError, match="runs on OpenVINO only; this prediction runs onnxruntime"):
    predictor.precision_note(settings, "onnxruntime", {}, tmp_path)
  with pytest.raises(ConfigError, match="is a training workdir: export it first"):
    predictor.precision_note(settings, "openvino", None, tmp_path)
  assert predictor.precision_note(runtimes.WindowSettings(), "jax", None, tmp_path) == ""


def test_measure_counts_changed_labels_and_dice_on_a_known_case():
  """f32 predicts the label exactly; "bf16" loses ET: its voxels turn NCR."""
  config = smoke_config("resfuse", **{"data.patch_size": (16, 16, 16)})
  regions = data.get_dataset("phantom").regions  # WT {1,2,3} ⊇ TC {1,3} ⊇ ET {3}
  label = np.zeros((24, 20, 20), np.uint8)
  label[4:20, 4:16, 4:16] = 2
  label[8:16, 6:14, 6:14] = 1
  label[10:14, 8:12, 8:12] = 3
  case = data.Case("c", label * 0.0, label.astype(np.float32), label, (1.0, 1.0, 1.0), np.eye(4),
                   label.shape, ((0, 24), (0, 20), (0, 20)))  # fmt: skip

  def f32(tiles):
    post = tiles[..., 1]
    return np.stack([post > 0, (post == 1) | (post == 3), post == 3], -1).astype(np.float32)

  def lost_et(tiles):
    return f32(tiles) * np.array([1, 1, 0], np.float32)

  record = precision.measure({"f32": f32, "bf16": lost_et}, [case], config, regions, None)
  assert record["cases"] == 1 and record["voxels"] == label.size
  assert record["changed_label_share"] == pytest.approx((label == 3).sum() / label.size)
  assert record["dice_f32"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
  assert record["dice_change"] == {"WT": 0.0, "TC": 0.0, "ET": -1.0}
  assert record["max_abs_prob_change"] == pytest.approx(1.0)
  assert precision.problems(record)[0].startswith("changed the label of 0.667% of voxels")


# ----- the compiled model's cache and the knobs -------------------------------------------


@pytest.fixture(scope="module")
def graph(source, tmp_path_factory):
  folder = tmp_path_factory.mktemp("graph")
  return folder / onnx_runtime.FILE, exporting.write_onnx(folder, source[0], "yes", {})["sha256"]


def test_the_compiled_model_is_cached_by_graph_openvino_cpu_and_settings(
  graph, tmp_path, monkeypatch
):
  path, sha = graph
  monkeypatch.setenv("RESFUSE_CACHE", str(tmp_path / "cache"))
  tiles = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 2)).astype(np.float32)
  first = openvino_runtime.OpenVinoWindow(path, sha)
  assert first.cached == "compiled"
  (blob,) = (tmp_path / "cache" / "openvino").glob("*.blob")
  again = openvino_runtime.OpenVinoWindow(path, sha)
  assert again.cached == "loaded"
  np.testing.assert_array_equal(again(tiles), first(tiles))
  assert openvino_runtime.OpenVinoWindow(path, sha, threads=1).cached == "compiled"  # its own key
  assert len(list(blob.parent.glob("*.blob"))) == 2
  props = openvino_runtime.compile_properties("f32")
  keys = {openvino_runtime.cache_key(sha, props), openvino_runtime.cache_key("0" * 64, props)}
  keys.add(openvino_runtime.cache_key(sha, openvino_runtime.compile_properties("bf16")))
  assert len(keys) == 3 and blob.stem in keys
  data_ = bytearray(blob.read_bytes())
  data_[len(data_) // 2] ^= 0xFF
  blob.write_bytes(bytes(data_))  # damaged: compiled again, never imported
  assert openvino_runtime.OpenVinoWindow(path, sha).cached == "compiled"
  assert openvino_runtime.OpenVinoWindow(path, sha).cached == "loaded"
  (tmp_path / "blocked").write_text("a file where the cache folder would be")
  monkeypatch.setenv("RESFUSE_CACHE", str(tmp_path / "blocked"))
  uncached = openvino_runtime.OpenVinoWindow(path, sha)  # an unwritable cache costs the compile
  assert uncached.cached == "uncached"
  np.testing.assert_array_equal(uncached(tiles), first(tiles))


def test_threads_streams_and_windows_per_call_are_settable(graph):
  path, sha = graph
  tiles = np.random.default_rng(1).normal(size=(3, 16, 16, 16, 2)).astype(np.float32)
  reference = openvino_runtime.OpenVinoWindow(path, sha)(tiles)
  one = openvino_runtime.OpenVinoWindow(path, sha, threads=1, max_batch=2)
  assert int(one.compiled.get_property("INFERENCE_NUM_THREADS")) == 1 and one.max_batch == 2
  streams = openvino_runtime.OpenVinoWindow(path, sha, streams=2)
  assert int(streams.compiled.get_property("NUM_STREAMS")) == 2 and streams.queue is not None
  for window in (one, streams):
    np.testing.assert_allclose(window(tiles), reference, atol=1e-5)  # other kernels: ~1e-6
  settings = runtimes.WindowSettings("f32", threads=1, streams=0, windows_per_call=3)
  made = runtimes.make_window("onnxruntime", path, sha, settings, 3)
  assert made.max_batch == 3 and made.backend == "onnxruntime"


def test_a_replaced_graph_is_refused_before_openvino_reads_it(graph, tmp_path):
  path, _ = graph
  with pytest.raises(CheckpointError, match="does not match the SHA-256 recorded in export.json"):
    openvino_runtime.OpenVinoWindow(path, "0" * 64)
  with pytest.raises(CheckpointError, match="outputs 3 channels, the config has 2 regions"):
    openvino_runtime.OpenVinoWindow(path, regions=2)


# ----- predict --workdir=W: the graph built into the user's cache once ----------------------


def listing(folder):
  return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_workdir_graph_is_built_once_into_the_cache(
  trained_workdir, small_cases, tmp_path, monkeypatch
):
  before = listing(trained_workdir)
  graphs = onnx_cache.WorkdirGraphs(tmp_path / "onnx")
  first = Predictor.load(trained_workdir, None, "auto", graphs=graphs)
  assert first.backend == "openvino" and first.backend_note == AUTO
  (entry,) = (tmp_path / "onnx").iterdir()
  record = json.loads((entry / onnx_cache.RECORD).read_text())
  assert record["step"] == first.step and record["build_s"] > 0
  assert record["sha256"] == files.sha256(entry / onnx_runtime.FILE)

  def no_build(*args):
    raise AssertionError("built again")

  monkeypatch.setattr(exporting, "write_onnx", no_build)
  again = Predictor.load(trained_workdir, None, "openvino", graphs=graphs)
  assert again.window_fn().path == entry / onnx_runtime.FILE
  jax_p = Predictor.load(trained_workdir)
  case = small_cases[0]
  np.testing.assert_allclose(again.probabilities(case), jax_p.probabilities(case), atol=1e-4)
  assert listing(trained_workdir) == before  # nothing written into W


def test_predict_workdir_says_its_choice_first_and_reuses_the_cache(
  trained_workdir, small_phantom, tmp_path
):
  from resfuse_jax.data import brats

  case = brats.find_cases(small_phantom[0])[0]
  env = {**os.environ, "RESFUSE_CACHE": str(tmp_path / "cache")}
  runs = []
  for i in range(2):
    out = tmp_path / f"{i}.nii.gz"
    cmd = [sys.executable, "-m", "resfuse_jax.predict", f"--workdir={trained_workdir}",
           f"--pre={case.pre}", f"--post={case.post}", f"--out={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(checkpoint step 2, openvino)")
    runs.append([line for line in proc.stderr.splitlines() if "backend.py" not in line])
  first, second = runs
  assert first[0].endswith(f"window function: openvino ({AUTO})")  # before any slow step
  assert [line for line in first if "built the ONNX graph of" in line]
  assert [line for line in second if "(cached)" in line]
  assert [line for line in second if "OpenVINO: loaded the compiled model.onnx" in line]


def _conv_norm_graph(channels: int, size: int, eps: float = 1e-6) -> bytes:
  """x [n, 1, s, s, s] -> Conv 3^3 (1 -> channels) -> InstanceNormalization -> y: the layer
  pair where OpenVINO's channel sums lose accuracy (a conv output in its blocked layout)."""
  import onnx
  from onnx import TensorProto, helper, numpy_helper

  rng = np.random.default_rng(0)
  weights = {
    "w": rng.normal(0, 0.3, (channels, 1, 3, 3, 3)).astype(np.float32),
    "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
    "bias": rng.normal(0, 0.1, channels).astype(np.float32),
  }
  nodes = [
    helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 6),
    helper.make_node("InstanceNormalization", ["c", "scale", "bias"], ["y"], epsilon=eps),
  ]
  shape = ["n", 1, size, size, size]
  graph = helper.make_graph(
    nodes, "conv_norm",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", channels, size, size, size])],
    [numpy_helper.from_array(v, k) for k, v in weights.items()],
  )  # fmt: skip
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  return model.SerializeToString(), weights, onnx


def _reference(x: np.ndarray, weights: dict) -> np.ndarray:
  """The conv + instance norm in float64 (numpy/scipy): what both graphs should compute."""
  from scipy import ndimage

  w = weights["w"].astype(np.float64)
  out = []
  for c in range(w.shape[0]):
    conv = ndimage.correlate(x[0, 0].astype(np.float64), w[c, 0], mode="constant")
    z = (conv - conv.mean()) / np.sqrt(conv.var() + 1e-6)
    out.append(z * weights["scale"][c] + weights["bias"][c])
  return np.stack(out)[None]


def test_large_instance_norms_are_staged_and_compute_the_same_function():
  from resfuse_jax.inference import openvino_norms

  graph, weights, onnx = _conv_norm_graph(4, 24)
  unchanged, staged = openvino_norms.rewrite(graph)  # 24^3 < MIN_VOXELS: left alone
  assert (unchanged, staged) == (graph, 0)
  rewritten, staged = openvino_norms.rewrite(graph, min_voxels=1)
  assert staged == 1
  ops = [n.op_type for n in onnx.load_from_string(rewritten).graph.node]
  assert "InstanceNormalization" not in ops and {"ReduceL2", "ReduceSum"} <= set(ops)
  import onnxruntime

  x = np.random.default_rng(1).normal(size=(1, 1, 24, 24, 24)).astype(np.float32)
  reference = _reference(x, weights)
  for blob in (graph, rewritten):
    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], reference, atol=2e-5)


def test_staged_norms_make_openvinos_channel_sums_accurate():
  """OpenVINO's own InstanceNormalization after a conv is off by a per-channel scale that grows
  with the window (BUILD_NOTES, issue 31); staged, it matches float64 to float32 rounding."""
  from resfuse_jax.inference import openvino_norms

  graph, weights, _ = _conv_norm_graph(8, 64)
  x = np.random.default_rng(2).normal(size=(1, 1, 64, 64, 64)).astype(np.float32)
  reference = _reference(x, weights)
  errors = {}
  core = openvino_runtime.core()
  for name, blob in (("exported", graph), ("staged", openvino_norms.rewrite(graph)[0])):
    compiled = core.compile_model(core.read_model(blob), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    errors[name] = float(np.abs(compiled({"x": x})[0] - reference).max())
  assert errors["staged"] < 2e-5, errors
  assert errors["staged"] < errors["exported"] / 3, errors


@pytest.mark.parametrize("model_name", ["resunet", "resfuse"])  # resunet leaves pre unused
def test_a_staged_graph_runs_every_model_through_the_openvino_window(
  model_name, tmp_path, monkeypatch
):
  from benchmarks import suite
  from resfuse_jax.inference import openvino_norms

  path = tmp_path / "model.onnx"
  suite.onnx_export(model_name, 16, 2, str(path))
  tiles = np.random.default_rng(3).normal(size=(2, 16, 16, 16, 2)).astype(np.float32)
  exported = openvino_runtime.OpenVinoWindow(path, cache=False)(tiles)
  monkeypatch.setattr(openvino_norms, "MIN_VOXELS", 1)  # every norm staged at this toy size
  assert openvino_norms.rewrite(path.read_bytes())[1] > 0
  window = openvino_runtime.OpenVinoWindow(path, cache=False)
  assert not list(tmp_path.iterdir())[1:]  # the staged graph was never written beside the model
  np.testing.assert_allclose(window(tiles), exported, atol=1e-5)
