import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resfuse_jax.models import layers


def test_space_to_depth_roundtrip():
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 8, 3))
  y = layers.space_to_depth(x)
  assert y.shape == (2, 2, 3, 4, 24)
  np.testing.assert_array_equal(layers.depth_to_space(y), x)


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
  y = up.apply(params, x)
  assert y.shape == (1, 6, 4, 8, 3)
  k = params["params"]["dense"]["kernel"].reshape(2, 2, 2, 2, 3)  # (I, kd, kh, kw, O)
  b = params["params"]["dense"]["bias"].reshape(2, 2, 2, 3)
  for d, h, w in [(0, 0, 0), (2, 1, 3), (1, 0, 2)]:
    block = jnp.einsum("i,ipqro->pqro", x[0, d, h, w], k) + b
    np.testing.assert_allclose(
      y[0, 2 * d : 2 * d + 2, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2], block, rtol=1e-5, atol=1e-5
    )


def test_conv3_rejects_other_strides():
  with pytest.raises(ValueError, match="strides"):
    layers.Conv3(2, strides=3).init(jax.random.key(0), jnp.zeros((1, 6, 6, 6, 1)))
