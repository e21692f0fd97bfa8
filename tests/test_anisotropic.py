"""Per-axis strides (``model.strides``): anisotropic pooling in every model, the exact
stride rewrites per axis, ONNX export, and configs written before the key existed."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_config

from resfuse_jax import config_lib, models, validation, workdir
from resfuse_jax.errors import ConfigError
from resfuse_jax.models import convolution, layers

DN3 = ("NDHWC", "DHWIO", "NDHWC")
PER_AXIS = [(1, 2, 2), (2, 1, 2), (2, 2, 1), (1, 1, 2), (2, 2, 2)]
# Slice axis (depth) pooled only at the last level, as the planner does for 0.8x0.8x4 mm data.
ANISOTROPIC = ((1, 1, 1), (1, 2, 2), (2, 2, 2))


@pytest.mark.parametrize("factors", PER_AXIS)
def test_space_to_depth_roundtrip_per_axis(factors):
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 8, 3))
  y = convolution.space_to_depth(x, factors)
  assert y.shape == (2, 4 // factors[0], 6 // factors[1], 8 // factors[2], 3 * np.prod(factors))
  np.testing.assert_array_equal(convolution.depth_to_space(y, factors), x)


@pytest.mark.parametrize("strides", PER_AXIS)
def test_per_axis_strided_conv3_is_xlas_strided_conv_forward_and_backward(strides):
  """Every plan (space-to-depth over 'xla' or 'planes', XLA's strided) against lax with SAME."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 4, 8, 3))
  plans = [
    convolution.ConvPlan("xla", "space_to_depth"),
    convolution.ConvPlan("planes", "space_to_depth"),
    convolution.ConvPlan("xla", "strided"),
  ]
  params = layers.Conv3(5, strides, use_bias=False).init(jax.random.key(2), x)
  kernel = params["params"]["kernel"]

  def reference(k, x):
    return jax.lax.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=DN3)

  def loss(f):
    return lambda k, x: jnp.sum(jnp.sin(f(k, x)))

  expected = reference(kernel, x)
  assert expected.shape == (2, 6 // strides[0], 4 // strides[1], 8 // strides[2], 5)
  grads = jax.grad(loss(reference), (0, 1))(kernel, x)
  for plan in plans:
    conv = layers.Conv3(5, strides, use_bias=False, conv_impl=plan)
    ours = lambda k, x, conv=conv: conv.apply({"params": {"kernel": k}}, x)  # noqa: E731
    np.testing.assert_allclose(ours(kernel, x), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(loss(ours), (0, 1))(kernel, x), grads, strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides", PER_AXIS[:2])
def test_per_axis_conv1_is_a_strided_1x1x1_conv(strides):
  x = jax.random.normal(jax.random.key(3), (1, 4, 4, 6, 2))
  conv = layers.Conv1(3, strides=strides, use_bias=False)
  params = conv.init(jax.random.key(4), x)
  k = params["params"]["dense"]["kernel"].reshape(1, 1, 1, 2, 3)
  ref = jax.lax.conv_general_dilated(x, k, strides, "VALID", dimension_numbers=DN3)
  np.testing.assert_allclose(conv.apply(params, x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factors", PER_AXIS)
def test_per_axis_upconv_is_xlas_transposed_conv_with_the_same_parameters(factors):
  """Each input voxel paints an fd x fh x fw block; depth-to-space and conv_transpose agree."""
  x = jax.random.normal(jax.random.key(5), (1, 3, 2, 4, 2))
  d2s = layers.UpConv(3, factors=factors)
  transpose = layers.UpConv(
    3, conv_impl=convolution.ConvPlan(upsample="transpose"), factors=factors
  )
  params = jax.tree.map(lambda p: p + 0.1, d2s.init(jax.random.key(6), x))
  assert params["params"]["dense"]["kernel"].shape == (2, 3 * int(np.prod(factors)))
  assert jax.tree.map(jnp.shape, transpose.init(jax.random.key(6), x)) == jax.tree.map(
    jnp.shape, params
  )
  y = d2s.apply(params, x)
  assert y.shape == (1, 3 * factors[0], 2 * factors[1], 4 * factors[2], 3)
  np.testing.assert_allclose(transpose.apply(params, x), y, rtol=1e-5, atol=1e-5)
  k = params["params"]["dense"]["kernel"].reshape(2, *factors, 3)
  fd, fh, fw = factors
  for d, h, w in [(0, 0, 0), (2, 1, 3)]:
    block = jnp.einsum("i,ipqro->pqro", x[0, d, h, w], k) + params["params"]["bias"]
    got = y[0, fd * d : fd * (d + 1), fh * h : fh * (h + 1), fw * w : fw * (w + 1)]
    np.testing.assert_allclose(got, block, rtol=1e-5, atol=1e-5)


def build(name, strides, **model_config):
  cfg = config_lib.base_config("resfuse").model
  cfg.update({"name": name, "features": (4, 8, 8), "strides": strides, "conv_impl": "xla"})
  cfg.update(model_config)
  return models.build(cfg, num_outputs=3)


@pytest.mark.parametrize("name", models.names())
def test_every_model_pools_per_axis_and_its_rewrites_are_exact(name):
  """An anisotropic patch through each model: its shape kept, and the space/depth rewrites
  compute what XLA's strided and transposed convolutions compute, same parameters."""
  x = jax.random.normal(jax.random.key(7), (1, 4, 8, 8, 1))
  ours = build(name, ANISOTROPIC)
  params = ours.init(jax.random.key(8), x, x)["params"]
  xla = build(name, ANISOTROPIC, downsample="strided", upsample="transpose")
  assert jax.tree.map(jnp.shape, xla.init(jax.random.key(8), x, x)["params"]) == jax.tree.map(
    jnp.shape, params
  )
  got = ours.apply({"params": params}, x, 1.5 * x, mutable=["aux_logits"])
  want = xla.apply({"params": params}, x, 1.5 * x, mutable=["aux_logits"])
  assert got[0].shape == (1, 4, 8, 8, 3)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # The slice axis is never pooled at level 1: that level's upsampling kernel paints 1x2x2.
  up = params["decoder"]["up0"]["dense"]["kernel"] if "decoder" in params else None
  if up is not None:
    assert up.shape[-1] == 4 * 4  # features[0] x (1 * 2 * 2)


def test_isotropic_strides_written_out_are_the_default_model():
  x = jax.random.normal(jax.random.key(9), (1, 8, 8, 8, 1))
  default, explicit = build("resfuse", None), build("resfuse", ((1, 1, 1), (2, 2, 2), (2, 2, 2)))
  params = default.init(jax.random.key(10), x, x)["params"]
  np.testing.assert_array_equal(
    explicit.apply({"params": params}, x, x), default.apply({"params": params}, x, x)
  )


@pytest.mark.parametrize(
  "strides, message",
  [
    (((1, 1, 1), (2, 2, 2)), r"one per-axis triple .* per encoder level \(3\)"),
    (((2, 2, 2), (2, 2, 2), (2, 2, 2)), r"the first\s+\(1, 1, 1\)"),
    (((1, 1, 1), (3, 2, 2), (2, 2, 2)), "triple of 1s and 2s"),
  ],
)
def test_malformed_strides_are_one_line_config_errors(strides, message):
  with pytest.raises(ConfigError, match="config.model.strides="):
    build("resunet", strides)
  config = smoke_config("resfuse", **{"model.features": (4, 8, 8), "model.strides": strides})
  found = validation.problems(config)
  assert len(found) == 1 and found[0].startswith("config.model.strides=")
  assert re.search(message, found[0])


def test_a_patch_the_strides_cannot_halve_is_refused_per_axis():
  config = smoke_config(
    "resfuse",
    **{"model.features": (4, 8, 8), "model.strides": ANISOTROPIC, "data.patch_size": (6, 16, 18)},
  )
  assert config_lib.downsampling(config.model) == (2, 4, 4)
  (line,) = validation.problems(config)
  assert "config.data.patch_size=(6, 16, 18)" in line and "(2, 4, 4)" in line
  assert line.endswith("e.g. (6, 16, 16)")
  config.data.patch_size = (2, 16, 12)  # the slice axis pooled once only: 2 voxels suffice
  assert validation.problems(config) == []


def test_a_config_json_written_before_strides_resumes_as_the_isotropic_model(tmp_path):
  """No model.strides key: filled as None (isotropic), and resuming sees no change."""
  config = smoke_config("resfuse")
  saved = json.loads(json.dumps(config.to_dict()))
  del saved["model"]["strides"]
  (tmp_path / workdir.CONFIG).write_text(json.dumps(saved))
  old = workdir.read_config(tmp_path)
  assert old.model.strides is None
  assert workdir.resume_conflicts(saved, config) == []
  changed = smoke_config("resfuse", **{"model.strides": ((1, 1, 1), (1, 2, 2))})
  assert workdir.resume_conflicts(saved, changed) == [
    "model.strides: None -> [[1, 1, 1], [1, 2, 2]]"
  ]


def test_an_old_workdir_without_strides_predicts_as_before(trained_workdir, tmp_path):
  from resfuse_jax.inference.predictor import Predictor

  copy = tmp_path / "old"
  shutil.copytree(trained_workdir, copy)
  saved = json.loads((copy / workdir.CONFIG).read_text())
  del saved["model"]["strides"]
  (copy / workdir.CONFIG).write_text(json.dumps(saved))
  old, new = Predictor.load(copy), Predictor.load(trained_workdir)
  tiles = np.random.default_rng(0).normal(size=(1, *old.config.data.patch_size, 2))
  np.testing.assert_array_equal(old.window_fn()(tiles), new.window_fn()(tiles))


def test_an_anisotropic_model_exports_to_onnx_and_agrees(tmp_path):
  onnx = pytest.importorskip("onnx")
  pytest.importorskip("onnxruntime")
  from test_onnx_export import random_model, run_onnx

  from resfuse_jax.serving import onnx_graph

  overrides = {"model.features": (4, 8, 8), "model.strides": ANISOTROPIC}
  overrides["data.patch_size"] = (8, 16, 16)
  _, model, params, patch = random_model("resfuse", 4, **overrides)
  proto = onnx_graph.to_onnx(model, params, patch)
  onnx.checker.check_model(proto)
  tiles = np.random.default_rng(1).normal(size=(2, *patch, 2)).astype(np.float32)
  expected = np.asarray(model.apply({"params": params}, tiles[..., :1], tiles[..., 1:]))
  np.testing.assert_allclose(run_onnx(proto, tiles), expected, atol=1e-4, rtol=0)
  assert layers.level_strides(ANISOTROPIC, 3) == ANISOTROPIC
