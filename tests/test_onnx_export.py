"""model.onnx: the window function as an ONNX graph, run by onnxruntime behind `predict`."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, smoke_config

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from resfuse_jax import config_lib, data, files, models, task  # noqa: E402
from resfuse_jax.data import brats  # noqa: E402
from resfuse_jax.errors import CheckpointError, ConfigError  # noqa: E402
from resfuse_jax.inference import (  # noqa: E402
  integrity,
  onnx_runtime,
  postprocess,
  prediction,
  predictor,
  runtimes,
  tiler,
)
from resfuse_jax.inference.predictor import Predictor  # noqa: E402
from resfuse_jax.models import convolution  # noqa: E402
from resfuse_jax.serving import exporting, onnx_graph  # noqa: E402

ATOL = 1e-4


def random_model(variant, seed=0, **overrides):
  """A tiny model with random parameters (no init compiled): kernels He-scaled, norms'
  scales and every bias moved off 1 and 0, so each parameter changes the output."""
  config = smoke_config(variant, **overrides)
  model = task.build_model(config)
  patch = tuple(config.data.patch_size)
  x = jax.ShapeDtypeStruct((1, *patch, 1), jnp.float32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, t)["params"], x)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if leaf.ndim >= 2:  # kernels
      return noise * np.float32(np.sqrt(2.0 / np.prod(leaf.shape[:-1])))
    return noise * 0.2 + (1.0 if path[-1].key == "scale" else 0.0)

  return config, model, jax.tree_util.tree_map_with_path(draw, shapes), patch


VARIANTS = [
  "resfuse",
  "resfuse_identity",
  "resfuse_gate",
  "resfuse_single_scale",
  "resunet",
  "resunet_early",
  "a2fnet",
  "tsf_seq2seq",
  "lits",
]


def run_onnx(proto, tiles, output="logits"):
  """[n, d, h, w, 2] tiles -> [n, d, h, w, R] logits (or probabilities) from the ONNX graph."""
  session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  x = np.moveaxis(tiles, -1, 1)
  feeds = {"pre": np.ascontiguousarray(x[:, :1]), "post": np.ascontiguousarray(x[:, 1:])}
  return np.moveaxis(session.run([output], feeds)[0], 1, -1)


def flax_logits(model, params, tiles):
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t[..., :1], t[..., 1:]))
  return np.asarray(apply(params, tiles))


def assert_probabilities_agree(got, expected, variant):
  """Within ATOL; LiTS by labels on >= 99.9% of voxels (floor/threshold discontinuities)."""
  if variant == "lits":
    assert ((got > 0.5) == (expected > 0.5)).mean() >= 0.999
  else:
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_every_variant_is_registered_here():
  assert set(VARIANTS) == set(config_lib.VARIANTS)
  assert {config_lib.VARIANTS[v][0] for v in VARIANTS} == set(models.names())


@pytest.fixture(scope="module", params=VARIANTS)
def variant_export(request, tmp_path_factory):
  """Each registered model with random parameters through the backend's own path
  (`write_onnx`), and JAX's probabilities of 3 random tiles, which every runtime meets."""
  variant = request.param
  config, _, params, patch = random_model(variant)
  p = Predictor(config, params, 0)
  folder = tmp_path_factory.mktemp(f"onnx_{variant}")
  record = exporting.write_onnx(folder, p, "yes", {})
  tiles = np.random.default_rng(0).normal(size=(3, *patch, 2)).astype(np.float32)
  return variant, folder / onnx_runtime.FILE, record, tiles, p.window_fn()(tiles)


def test_every_variant_exports_and_onnxruntime_agrees_with_jax(variant_export):
  variant, path, record, tiles, expected = variant_export
  patch = tiles.shape[1:4]
  proto = onnx.load(str(path))
  assert proto.opset_import[0].version == onnx_graph.OPSET == record["opset"]
  assert [i.name for i in proto.graph.input] == ["pre", "post"]
  assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
  dims = proto.graph.input[0].type.tensor_type.shape.dim
  assert dims[0].dim_param == "n" and [d.dim_value for d in dims[1:]] == [1, *patch]
  window = onnx_runtime.OnnxWindow(path, record["sha256"], max_batch=3)
  assert_probabilities_agree(window(tiles), expected, variant)
  assert_probabilities_agree(window(tiles[1:2]), expected[1:2], variant)  # another batch
  assert (expected < 0.1).any() and (expected > 0.9).any()  # a real signal, not constants


def test_every_variant_runs_through_openvino_and_agrees_with_jax(variant_export):
  """Issue 31's acceptance bound is 1e-3 in probability and >= 99.9% of labels; measured
  at f32 on these models, OpenVINO 2026.4 vs JAX: max |Δprob| 1.1e-6 to 2.1e-6, LiTS 8.6e-6
  (onnxruntime: 0.6e-6 to 2.2e-6), every label equal. ATOL (1e-4) is asserted."""
  from resfuse_jax.inference import openvino_runtime

  if not openvino_runtime.available():  # importorskip would import it with its telemetry
    pytest.skip("openvino is not installed")
  variant, path, record, tiles, expected = variant_export
  window = openvino_runtime.OpenVinoWindow(path, record["sha256"], regions=expected.shape[-1])
  got = window(tiles)
  assert window.backend == "openvino" and window.precision == "f32"
  assert_probabilities_agree(got, expected, variant)
  assert ((got > 0.5) == (expected > 0.5)).mean() >= 0.999
  assert_probabilities_agree(window(tiles[1:2]), expected[1:2], variant)


def test_a_model_with_another_window_and_batch():
  overrides = {"model.features": (4, 8, 16), "data.patch_size": (16, 24, 32)}
  _, model, params, patch = random_model("resfuse_gate", 3, **overrides)
  proto = onnx_graph.to_onnx(model, params, patch)
  tiles = np.random.default_rng(3).normal(size=(5, *patch, 2)).astype(np.float32)
  expected = flax_logits(model, params, tiles)
  np.testing.assert_allclose(run_onnx(proto, tiles), expected, atol=ATOL, rtol=0)
  np.testing.assert_allclose(run_onnx(proto, tiles[:1]), expected[:1], atol=ATOL, rtol=0)


def test_every_traced_form_computes_the_same_function():
  """The training plan's rewrites and InstanceNorm as plain primitives translate too."""
  _, model, params, patch = random_model("resfuse", 5)
  tiles = np.random.default_rng(5).normal(size=(2, *patch, 2)).astype(np.float32)
  expected = flax_logits(model, params, tiles)
  rewrites = convolution.ConvPlan("planes", "space_to_depth", "depth_to_space")
  for form in ({"plan": rewrites}, {"fuse_norms": False}):
    proto = onnx_graph.to_onnx(model, params, patch, **form)
    np.testing.assert_allclose(run_onnx(proto, tiles), expected, atol=ATOL, rtol=0)


def test_the_exported_graph_is_channels_first_with_textbook_operators():
  """What keeps it as fast as a hand-written graph: no Transpose, fused norms and biases."""
  _, model, params, patch = random_model("resfuse")
  graph = onnx_graph.to_onnx(model, params, patch).graph
  nodes, ops = graph.node, [n.op_type for n in graph.node]
  assert "Transpose" not in ops and "Expand" not in ops and "ReduceSum" not in ops
  assert "InstanceNormalization" in ops
  assert ops.count("ConvTranspose") == len(model.features) - 1
  convs = [n for n in nodes if n.op_type == "Conv"]
  floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
  assert not [n for n in nodes if n.op_type == "Add" and floats & set(n.input)]  # biases fused
  strides = [a.ints for n in convs for a in n.attribute if a.name == "strides"]
  assert [2, 2, 2] in strides


class Cumulative(nn.Module):
  """A model whose forward pass uses a primitive the translator has no emitter for."""

  num_outputs: int = 1

  @nn.compact
  def __call__(self, pre, post):
    return jnp.cumsum(post + pre, axis=1)


def test_an_unsupported_primitive_fails_clearly(tmp_path):
  with pytest.raises(onnx_graph.NotExportable, match="primitive 'cumsum' has no ONNX emitter"):
    onnx_graph.to_onnx(Cumulative(), {}, (16, 16, 16))
  config, _, params, _ = random_model("resunet")
  p = Predictor(config, params, 0)
  p.model = Cumulative()
  with pytest.raises(ConfigError, match="cumsum"):
    exporting.write_onnx(tmp_path, p, "yes", {})
  record = exporting.write_onnx(tmp_path, p, "auto", {})  # auto: the export goes on without it
  assert record["written"] is False and "cumsum" in record["reason"]
  assert not (tmp_path / onnx_runtime.FILE).exists()


def test_the_last_partial_batch_is_sent_as_it_is():
  volume = np.random.default_rng(0).normal(size=(40, 20, 20, 2)).astype(np.float32)
  seen = {True: [], False: []}

  def window(fixed):
    def predict(tiles):
      seen[fixed].append(len(tiles))
      return np.repeat(tiles.mean(-1, keepdims=True), 3, -1)  # any pure per-tile function

    return predict

  out = {
    fixed: tiler.sliding_window(
      window(fixed), volume, (16, 16, 16), overlap=0.5, batch_size=3, fixed_batch=fixed
    )
    for fixed in (True, False)
  }
  tiles = len(tiler.window_starts((40, 20, 20), (16, 16, 16), 0.5))
  assert tiles % 3 != 0  # the case being tested
  assert seen[True] == [3] * -(-tiles // 3)
  assert seen[False] == [3] * (tiles // 3) + [tiles % 3] and sum(seen[False]) == tiles
  np.testing.assert_allclose(out[False], out[True], rtol=1e-6, atol=1e-6)


# On a trained workdir: export, metadata, predict --backend=onnxruntime.


@pytest.fixture(scope="module")
def onnx_export(trained_workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("onnx") / "model"
  exporting.export_model(trained_workdir, out, onnx="yes")
  return trained_workdir, out


@pytest.fixture(scope="module")
def phantom_case(small_phantom, onnx_export):
  root, _ = small_phantom
  case_files = brats.find_cases(root)[1]
  config = Predictor.load(onnx_export[0]).config
  case = data.preprocess_case(
    data.CaseFiles(case_files.case_id, case_files.pre, case_files.post, None),
    data.get_dataset(config.data.name).label_values,
    data.prep_settings(config.data),
  )
  return case_files, case


def test_export_records_the_onnx_model_and_how_to_deploy_it(onnx_export):
  _, out = onnx_export
  meta = json.loads((out / "export.json").read_text())
  record = meta["onnx"]
  assert record["written"] and record["opset"] == onnx_graph.OPSET
  assert record["sha256"] == files.sha256(out / onnx_runtime.FILE)
  assert record["inputs"]["pre"] == ["n", 1, 16, 16, 16]
  assert record["outputs"]["probabilities"] == ["n", 3, 16, 16, 16]
  deploy = meta["deploy"]
  assert deploy["sliding_window"]["window"] == [16, 16, 16]
  assert deploy["inputs"] == record["inputs"] and deploy["outputs"] == record["outputs"]
  assert deploy["labels"]["paint_order"] == [2, 1, 3]
  assert deploy["preprocessing"]["normalization"] == "zscore"
  rules = json.loads((out / "postprocessing.json").read_text())
  assert (deploy["postprocessing"] is None) == (not rules)
  proto = onnx.load(str(out / onnx_runtime.FILE))
  onnx.checker.check_model(proto, full_check=True)
  props = {p.key: p.value for p in proto.metadata_props}
  assert json.loads(props["resfuse_jax.regions"]) == ["WT", "TC", "ET"]
  assert json.loads(props["resfuse_jax.window"]) == [16, 16, 16]
  assert json.loads(props["resfuse_jax.deploy"]) == deploy
  assert props["resfuse_jax.step"] == str(meta["step"])


def test_onnx_windows_of_a_phantom_case_equal_jax(onnx_export, phantom_case):
  workdir, out = onnx_export
  _, case = phantom_case
  jax_p, ort_p = Predictor.load(out, backend="jax"), Predictor.load(out, backend="onnxruntime")
  assert (jax_p.backend, ort_p.backend) == ("jax", "onnxruntime")
  volume = np.stack([case.pre, case.post], -1)
  starts = tiler.window_starts(volume.shape[:3], (16, 16, 16), 0.5)[:3]
  tiles = np.stack([volume[tuple(slice(a, a + 16) for a in s)] for s in starts])
  np.testing.assert_allclose(ort_p.window_fn()(tiles), jax_p.window_fn()(tiles), atol=ATOL)


def test_predict_with_onnxruntime_gives_the_jax_labels(onnx_export, phantom_case, tmp_path):
  _, out = onnx_export
  case_files, case = phantom_case
  segs = {}
  for backend in ("jax", "onnxruntime"):
    seg = tmp_path / f"{backend}.nii.gz"
    cmd = [
      sys.executable, "-m", "resfuse_jax.predict", f"--model={out}", f"--backend={backend}",
      f"--pre={case_files.pre}", f"--post={case_files.post}", f"--out={seg}", "--tta",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"window function: {backend}" in proc.stderr
    segs[backend] = np.asarray(nib.load(str(seg)).dataobj)
  differ = segs["jax"] != segs["onnxruntime"]
  if differ.any():  # only voxels whose probability ties the threshold may differ
    probs = Predictor.load(out, backend="jax").probabilities(case, tta=True)
    margin = np.abs(probs - 0.5).min(-1)
    from resfuse_jax.data import geometry

    assert (geometry.to_original_grid(margin, case)[differ] < 1e-4).all()
  assert segs["jax"].any()
  labels = postprocess.region_label_values(data.get_dataset("phantom").regions)
  assert set(np.unique(segs["onnxruntime"])) <= {0, *labels}


@pytest.fixture(scope="module", params=["a2fnet", "lits"])
def random_export(request, tmp_path_factory):
  """An export of an untrained model (random parameters, no training run)."""
  config, _, params, _ = random_model(request.param)
  out = tmp_path_factory.mktemp(request.param) / "export"
  exporting.write_export(Predictor(config, params, 0), out, onnx="yes")
  return request.param, out


def test_predict_cli_with_onnxruntime_for_other_models(random_export, small_phantom, tmp_path):
  variant, out = random_export
  case_files = brats.find_cases(small_phantom[0])[1]
  seg = tmp_path / "onnxruntime.nii.gz"
  cmd = [
    sys.executable, "-m", "resfuse_jax.predict", f"--model={out}", "--backend=onnxruntime",
    f"--pre={case_files.pre}", f"--post={case_files.post}", f"--out={seg}",
  ]  # fmt: skip
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "window function: onnxruntime" in proc.stderr
  jax_p = prediction.load_predictor(None, str(out), None, backend="jax")
  options = (False, False, False)
  ref = prediction.predict_pair(
    jax_p, str(case_files.pre), str(case_files.post), str(tmp_path / "jax.nii.gz"), *options
  )
  got, expected = (np.asarray(nib.load(str(f)).dataobj) for f in (seg, ref))
  assert got.shape == expected.shape and (got == expected).mean() >= 0.999, variant


def test_backend_choice(onnx_export, tmp_path):
  workdir, out = onnx_export
  first = "openvino" if runtimes.installed("openvino") else "onnxruntime"  # test_openvino.py
  assert predictor.resolve_backend("auto", out) == first
  assert predictor.resolve_backend("auto", workdir) == "jax"  # no graph builder handed in
  with pytest.raises(ConfigError, match="training workdir, not an export"):
    predictor.resolve_backend("onnxruntime", workdir)
  with pytest.raises(ConfigError, match="--backend must be one of"):
    predictor.resolve_backend("tensorrt", out)


def test_an_export_without_onnx_still_predicts_with_jax(trained_workdir, phantom_case, tmp_path):
  out = exporting.export_model(trained_workdir, tmp_path / "plain", onnx="no")
  assert not (out / onnx_runtime.FILE).exists()
  assert json.loads((out / "export.json").read_text())["onnx"]["written"] is False
  loaded = prediction.load_predictor(None, str(out), None, backend="auto")
  assert loaded.backend == "jax"
  _, case = phantom_case
  assert np.isfinite(loaded.probabilities(case)).all()
  with pytest.raises(ConfigError, match="needs an export with model.onnx"):
    Predictor.load(out, backend="onnxruntime")


def test_a_damaged_onnx_file_is_refused(onnx_export, tmp_path):
  import shutil

  _, out = onnx_export
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  blob = bytearray((copy / onnx_runtime.FILE).read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  (copy / onnx_runtime.FILE).write_bytes(bytes(blob))
  with pytest.raises(CheckpointError, match="does not match the SHA-256"):
    Predictor.load(copy, backend="onnxruntime")
  meta = json.loads((copy / "export.json").read_text())
  del meta["onnx"]["sha256"]  # a model.onnx the export did not record
  (copy / "export.json").write_text(json.dumps(meta))
  with pytest.raises(
    CheckpointError, match="export.json does not match the SHA-256 recorded in it"
  ):
    Predictor.load(copy, backend="onnxruntime")
  (copy / "export.json").write_text(json.dumps(integrity.seal(meta, copy)))  # digest rewritten too
  with pytest.raises(CheckpointError, match="records no SHA-256 for model.onnx"):
    Predictor.load(copy, backend="onnxruntime")
