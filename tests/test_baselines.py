"""Baselines: shapes, parameter counts from their definitions, mechanisms, one training step."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from resfuse_jax import config_lib, losses, models, train
from resfuse_jax.data import brats, pipeline
from resfuse_jax.models import lits

FEATURES = (4, 8, 16)
R = 3  # WT, TC, ET
REGIONS = tuple(brats.REGIONS.values())


def build(name, features=FEATURES, conv_impl="auto"):
  cfg = config_lib.base_config(name).model
  cfg.update({"features": features, "conv_impl": conv_impl})
  return models.build(cfg, num_outputs=R)


def init(model, shape=(2, 16, 16, 16, 1)):
  x = jnp.zeros(shape)
  return model.init(jax.random.key(0), x, x)["params"]


def conv3(i, o, bias=True):
  return 27 * i * o + (o if bias else 0)


def head(c):  # norm -> ReLU -> conv1 to R logits
  return 2 * c + c * R + R


RESUNET = models.count_params(init(build("resunet")))
RESUNET_ENCODER = models.count_params(init(build("resunet"))["encoder"])
DECODER_FEATURES = RESUNET - RESUNET_ENCODER - head(FEATURES[0])  # decoder without its head


def expected_params(name):
  """Counted from each model's definition on top of the ResUNet backbone, not from the model."""
  c0 = FEATURES[0]
  if name in ("resunet", "resfuse"):
    return None  # pinned against each other in test_models.py
  if name == "resunet_early":  # the stem conv and its projection see a second channel
    return RESUNET + 27 * c0 + c0
  if name == "a2fnet":
    attention = conv3(2 * c0, c0) + 2 * c0 + conv3(c0, c0)  # conv3, norm, conv3 per sequence
    return (
      2 * (RESUNET_ENCODER + DECODER_FEATURES + head(c0))  # one ResUNet per sequence
      + DECODER_FEATURES
      + head(c0)  # average fusion decoder and its head
      + 2 * attention
      + conv3(2 * c0, c0)
      + head(c0)  # [fused, average] -> conv3 -> head
    )
  if name == "tsf_seq2seq":
    total = RESUNET + 8 + (8 * 2 + 2)  # shared encoder + decoder, task code, sequence weights
    for c in FEATURES:
      h = max(c // 4, 2)
      total += conv3(2 * c, c) + (c + 8) * h + h + h * c + c + 27 * 2  # conv, channel MLP, spatial
    return total
  if name == "lits":
    aggregate = sum(conv3(2 * c, 3) + 2 * c * 2 + 2 for c in FEATURES)  # offsets, softmax weights
    cin = c0 + 2 * R  # decoder features, confident probabilities, uncertain mask
    inpaint = 2 * cin + conv3(cin, c0) + 2 * c0 + conv3(c0, c0) + cin * c0 + 2 * c0 + head(c0)
    return 2 * RESUNET_ENCODER + aggregate + DECODER_FEATURES + head(c0) + inpaint
  raise AssertionError(f"no expected count for {name}")


@pytest.mark.parametrize("name", models.names())
def test_output_shape_and_parameter_count(name):
  model = build(name)
  params = init(model)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 16, 1))
  y = model.apply({"params": params}, x, x * 1.2)
  assert y.shape == (2, 16, 16, 16, R) and y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()
  expected = expected_params(name)
  if expected is not None:
    assert models.count_params(params) == expected


def test_resfuse_has_fewer_parameters_than_every_per_sequence_baseline():
  ours = models.count_params(init(build("resfuse")))
  for name in ("a2fnet", "tsf_seq2seq", "lits"):
    assert ours < models.count_params(init(build(name))), name


@pytest.fixture(scope="module")
def fixed_batch(small_cases):
  ds = pipeline.train_dataset(
    small_cases[:2],
    patch_size=(16, 16, 16),
    batch_size=2,
    regions=brats.REGIONS,
    fg_fraction=1.0,
    seed=0,
  )
  return {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}


@pytest.mark.parametrize("name", models.names())
def test_one_training_step_lowers_the_loss_on_a_fixed_batch(name, fixed_batch):
  model = build(name, features=(4, 8))
  cfg = ml_collections.ConfigDict(
    {
      "optimizer": "adamw",
      "lr": 3e-3,
      "warmup_steps": 0,
      "steps": 10,
      "weight_decay": 0.0,
      "grad_clip": 1.0,
      "aux_loss_weight": 1.0,
    }
  )
  tx = train.make_optimizer(cfg)
  state = train.init_state(model, tx, (16, 16, 16), jax.random.key(0))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, regions=REGIONS))
  state, m1 = step(state, fixed_batch)
  _, m2 = step(state, fixed_batch)
  before, after = m1.compute(), m2.compute()
  assert float(after["loss"]) < float(before["loss"])
  # Models with auxiliary outputs really train them.
  has_aux = name in ("a2fnet", "tsf_seq2seq", "lits")
  assert (float(before["aux_loss"]) > 0) == has_aux


def test_auxiliary_outputs_enter_the_loss_with_their_weight():
  key = jax.random.key(0)
  logits = jax.random.normal(key, (1, 4, 4, 4, 2))
  aux = [jax.random.normal(jax.random.key(1), (1, 4, 4, 4, 2))]
  targets = (jax.random.uniform(jax.random.key(2), (1, 4, 4, 4, 2)) > 0.5).astype(jnp.float32)
  main, _ = losses.dice_bce_loss(logits, targets)
  aux_only, _ = losses.dice_bce_loss(aux[0], targets)
  total, parts = losses.total_loss(logits, aux, targets, aux_weight=0.5)
  np.testing.assert_allclose(total, main + 0.5 * aux_only, rtol=1e-6)
  np.testing.assert_allclose(parts["aux_loss"], aux_only, rtol=1e-6)


# ----- LiTS ----------------------------------------------------------------------------------


def test_trilinear_warp_with_zero_offsets_is_the_identity():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 7, 3))
  out = lits.trilinear_warp(x, jnp.zeros((2, 5, 6, 7, 3)))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_trilinear_warp_matches_scipy_linear_interpolation():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 5, 7, 2)).astype(np.float32)
  offsets = rng.uniform(-2.5, 2.5, size=(1, 6, 5, 7, 3)).astype(np.float32)
  out = np.asarray(lits.trilinear_warp(jnp.asarray(x), jnp.asarray(offsets)))
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in (6, 5, 7)], indexing="ij"), -1)
  pos = np.clip(grid + offsets[0], 0, np.array([5, 4, 6]))  # border-clamped, as documented
  for c in range(2):
    ref = ndimage.map_coordinates(x[0, ..., c], np.moveaxis(pos, -1, 0), order=1)
    np.testing.assert_allclose(out[0, ..., c], ref, rtol=1e-5, atol=1e-5)


def test_deformable_aggregation_starts_as_identity_alignment_and_offsets_are_learnable():
  module = lits.DeformableAggregation(4)
  m = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 4))
  a = jax.random.normal(jax.random.key(1), (1, 8, 8, 8, 4))
  params = module.init(jax.random.key(2), m, a)["params"]
  out, sown = module.apply({"params": params}, m, a, mutable=["intermediates"])
  np.testing.assert_array_equal(np.asarray(sown["intermediates"]["offset_field"][0]), 0.0)
  # Fusion by a per-voxel softmax: the output is a convex combination of main and aux.
  lo, hi = jnp.minimum(m, a), jnp.maximum(m, a)
  assert bool(jnp.all(out >= lo - 1e-5) & jnp.all(out <= hi + 1e-5))
  grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, m, a) ** 2))(params)
  assert float(jnp.abs(grads["offsets"]["kernel"]).sum()) > 0


def test_uncertain_region_inpainting_keeps_confident_voxels():
  model = build("lits")
  params = init(model)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 16, 1)) * 3
  out, sown = model.apply({"params": params}, x, x * 1.5, mutable=["aux_logits"])
  (coarse,) = sown["aux_logits"]["coarse"]
  uncertain = np.asarray(lits.uncertain_mask(coarse)) > 0
  assert uncertain.any() and (~uncertain).any()  # both kinds of voxels in this input
  np.testing.assert_array_equal(np.asarray(out)[~uncertain], np.asarray(coarse)[~uncertain])
  assert not np.allclose(np.asarray(out)[uncertain], np.asarray(coarse)[uncertain])


# ----- A2FNet and TSF-Seq2Seq --------------------------------------------------------------


def test_a2fnet_attention_weights_sum_to_one_across_sequences():
  model = build("a2fnet")
  params = init(model)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 16, 1))
  _, sown = model.apply({"params": params}, x, 2 * x + 1, mutable=["intermediates"])
  (weights,) = sown["intermediates"]["fusion_weights"]
  assert weights.shape == (2, 2, 16, 16, 16, FEATURES[0])  # [sequence, B, D, H, W, C]
  np.testing.assert_allclose(np.asarray(weights.sum(axis=0)), 1.0, rtol=1e-6)
  assert float(weights.min()) >= 0 and float(jnp.std(weights)) > 0  # per-voxel, not constant


def test_a2fnet_supervises_every_branch():
  model = build("a2fnet")
  params = init(model)
  x = jnp.ones((1, 16, 16, 16, 1))
  _, sown = model.apply({"params": params}, x, x, mutable=["aux_logits"])
  assert set(sown["aux_logits"]) == {"pre", "post", "average"}


def test_tsf_seq2seq_shares_one_encoder_and_its_sequence_weights_sum_to_one():
  model = build("tsf_seq2seq", conv_impl="xla")  # one 3D conv primitive per layer in the jaxpr
  params = init(model)
  resunet = init(build("resunet"))
  assert jax.tree.map(jnp.shape, params["encoder"]) == jax.tree.map(jnp.shape, resunet["encoder"])
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 16, 1))
  _, sown = model.apply({"params": params}, x, x, mutable=["intermediates"])
  (weights,) = sown["intermediates"]["sequence_contributions"]
  assert weights.shape == (2,)
  np.testing.assert_allclose(float(weights.sum()), 1.0, rtol=1e-6)
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, x))(params)
  first_conv = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated")
  assert first_conv.invars[0].aval.shape[0] == 2 * x.shape[0]  # both sequences, one call
