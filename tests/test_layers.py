import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resfuse_jax.errors import ConfigError
from resfuse_jax.models import convolution, layers


def test_space_to_depth_roundtrip():
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 8, 3))
  y = convolution.space_to_depth(x)
  assert y.shape == (2, 2, 3, 4, 24)
  np.testing.assert_array_equal(convolution.depth_to_space(y), x)


@pytest.mark.parametrize("shape", [(1, 8, 8, 8, 3), (2, 6, 10, 4, 2)])
def test_stride2_conv3_equals_strided_lax_conv(shape):
  x = jax.random.normal(jax.random.key(1), shape)
  conv = layers.Conv3(5, strides=2, use_bias=False)
  params = conv.init(jax.random.key(2), x)
  ours = conv.apply(params, x)
  ref = jax.lax.conv_general_dilated(
    x,
    params["params"]["kernel"],
    (2, 2, 2),
    "SAME",
    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
  )
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_strided_conv1_is_subsampled_dense():
  x = jax.random.normal(jax.random.key(3), (1, 4, 4, 4, 2))
  conv = layers.Conv1(3, strides=2)
  params = conv.init(jax.random.key(4), x)
  k = params["params"]["dense"]["kernel"]
  b = params["params"]["dense"]["bias"]
  ref = (
    jax.lax.conv_general_dilated(
      x, k.reshape(1, 1, 1, 2, 3), (2, 2, 2), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    + b
  )
  np.testing.assert_allclose(conv.apply(params, x), ref, rtol=1e-5, atol=1e-6)


def test_upconv_equals_transposed_conv():
  """UpConv is a k2 s2 transposed conv: each input voxel paints a 2x2x2 block."""
  x = jax.random.normal(jax.random.key(5), (1, 3, 2, 4, 2))
  up = layers.UpConv(3)
  params = up.init(jax.random.key(6), x)
  assert jax.tree.map(jnp.shape, params["params"]) == {"bias": (3,), "dense": {"kernel": (2, 24)}}
  b = jax.random.normal(jax.random.key(7), (3,))  # one bias per channel, as ConvTranspose3d
  params = {"params": {**params["params"], "bias": b}}
  y = up.apply(params, x)
  assert y.shape == (1, 6, 4, 8, 3)
  k = params["params"]["dense"]["kernel"].reshape(2, 2, 2, 2, 3)  # (I, kd, kh, kw, O)
  for d, h, w in [(0, 0, 0), (2, 1, 3), (1, 0, 2)]:
    block = jnp.einsum("i,ipqro->pqro", x[0, d, h, w], k) + b
    np.testing.assert_allclose(
      y[0, 2 * d : 2 * d + 2, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2], block, rtol=1e-5, atol=1e-5
    )


def test_conv3_rejects_other_strides():
  with pytest.raises(ValueError, match="strides"):
    layers.Conv3(2, strides=3).init(jax.random.key(0), jnp.zeros((1, 6, 6, 6, 1)))


@pytest.mark.parametrize(
  "shape,kernel,padding",
  [
    ((2, 6, 5, 7, 3), (3, 3, 3), ((1, 1),) * 3),  # Conv3, stride 1
    ((1, 4, 3, 5, 16), (2, 2, 2), ((0, 1),) * 3),  # Conv3 stride 2 after space-to-depth
    ((1, 5, 4, 4, 2), (3, 1, 2), ((1, 1), (0, 0), (1, 0))),  # any kernel and padding
  ],
)
def test_conv3d_planes_is_the_3d_conv_with_its_gradients(shape, kernel, padding):
  """The CPU rewrite (sum of 2D convs over depth taps) against XLA's 3D conv, both grads."""
  x = jax.random.normal(jax.random.key(8), shape)
  w = jax.random.normal(jax.random.key(9), (*kernel, shape[-1], 4))

  def run(impl):
    y, vjp = jax.vjp(lambda x, w: convolution.conv3d(x, w, padding, impl), x, w)
    return (y, *vjp(jnp.cos(y)))

  ref = run("xla")
  ours = run("planes")
  assert ours[0].shape == ref[0].shape
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "name,backend,impl",
  [
    ("auto", "cpu", "planes"),
    ("auto", "gpu", "xla"),
    ("auto", "tpu", "xla"),
    ("xla", "cpu", "xla"),
    ("planes", "gpu", "planes"),
  ],
)
def test_resolve_conv_impl(name, backend, impl):
  assert convolution.resolve_conv_impl(name, backend) == impl


def test_resolve_conv_impl_defaults_to_this_backend():
  expected = "planes" if jax.default_backend() == "cpu" else "xla"
  assert convolution.resolve_conv_impl("auto") == expected


def test_unknown_conv_impl_is_a_config_error_listing_the_valid_ones():
  with pytest.raises(
    ConfigError, match="model.conv_impl must be one of auto, xla, planes; got 'fast'"
  ):
    convolution.resolve_conv_impl("fast")
  with pytest.raises(ValueError, match="resolve_conv_impl"):  # conv3d takes a resolved impl only
    convolution.conv3d(jnp.ones((1, 3, 3, 3, 1)), jnp.ones((3, 3, 3, 1, 1)), ((1, 1),) * 3, "auto")


@pytest.mark.parametrize("strides", [1, 2])
def test_conv3_impls_agree(strides):
  """The module field picks the implementation; parameters and outputs are the same."""
  x = jax.random.normal(jax.random.key(10), (2, 6, 4, 8, 3))
  xla, planes = (layers.Conv3(5, strides, conv_impl=impl) for impl in ("xla", "planes"))
  params = xla.init(jax.random.key(11), x)
  assert jax.tree.map(jnp.shape, planes.init(jax.random.key(11), x)) == jax.tree.map(
    jnp.shape, params
  )
  np.testing.assert_allclose(planes.apply(params, x), xla.apply(params, x), rtol=1e-5, atol=1e-5)


def test_strided_conv_equals_space_to_depth_forward_and_backward():
  x = jax.random.normal(jax.random.key(12), (2, 6, 4, 8, 3))
  s2d = layers.Conv3(5, 2, conv_impl=convolution.ConvPlan("xla", "space_to_depth"))
  strided = layers.Conv3(5, 2, conv_impl=convolution.ConvPlan("xla", "strided"))
  params = s2d.init(jax.random.key(13), x)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
  (gp_a, gx_a), (gp_b, gx_b) = (jax.grad(loss(m), (0, 1))(params, x) for m in (s2d, strided))
  np.testing.assert_allclose(strided.apply(params, x), s2d.apply(params, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx_b, gx_a, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(gp_b), jax.tree.leaves(gp_a)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_transpose_equals_depth_to_space_with_the_same_parameters():
  x = jax.random.normal(jax.random.key(14), (2, 3, 4, 2, 6))
  d2s = layers.UpConv(5, conv_impl=convolution.ConvPlan(upsample="depth_to_space"))
  transpose = layers.UpConv(5, conv_impl=convolution.ConvPlan(upsample="transpose"))
  params = d2s.init(jax.random.key(15), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
  assert jax.tree.map(jnp.shape, transpose.init(jax.random.key(15), x)) == jax.tree.map(
    jnp.shape, params
  )
  out = transpose.apply(params, x)
  assert out.shape == (2, 6, 8, 4, 5)
  np.testing.assert_allclose(out, d2s.apply(params, x), rtol=1e-5, atol=1e-5)


def test_conv3d_planes_takes_its_weight_gradient_from_one_3d_conv():
  """Forward and input gradient as 2D convs, the weight gradient as XLA's 3D one (faster on CPU)."""
  x = jnp.ones((1, 4, 4, 4, 2))
  w = jnp.ones((3, 3, 3, 2, 3))
  loss = lambda x, w: jnp.sum(convolution.conv3d(x, w, ((1, 1),) * 3, "planes") ** 2)  # noqa: E731
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
  convs = [line for line in hlo.splitlines() if " convolution(" in line]
  assert sum("size=3x3x3" in c or "size=4x4x4" in c for c in convs) == 1  # weight gradient
  assert sum("size=3x3 " in c for c in convs) == 6  # 3 forward planes + 3 input-gradient planes
