"""Training options for scale: gradient accumulation, bfloat16 compute, rematerialisation,
and the non-finite guard of the training step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import smoke_config
from scipy import ndimage

from resfuse_jax import losses, train
from resfuse_jax.task import build_model

REGIONS = ((1, 2, 3), (1, 3), (3,))
# Tests that read convolutions off a jaxpr want one 3D conv primitive per layer (the CPU
# default, ``planes``, spreads each over three 2D convs inside a custom_vjp).
XLA_CONV = {"model.conv_impl": "xla"}


def make_batch(n=4, size=16, seed=0):
  """Nested blobs of a smooth random field; ET is where post exceeds pre."""
  rng = np.random.default_rng(seed)
  field = ndimage.gaussian_filter(rng.normal(size=(n, size, size, size)), (0, 2, 2, 2))
  field = field / field.std()
  label = np.select([field > 1.2, field > 0.8, field > 0.4], [3, 1, 2], 0).astype(np.int32)
  pre = (field + 0.3 * rng.normal(size=field.shape)).astype(np.float32)[..., None]
  post = pre + 1.5 * (label[..., None] == 3)
  return {"pre": jnp.asarray(pre), "post": jnp.asarray(post), "label": jnp.asarray(label)}


def setup(**overrides):
  # No augmentation: these tests check the step's arithmetic on fixed batches.
  config = smoke_config(
    **{"train.warmup_steps": 0, "train.lr": 1e-2, "data.augment.preset": "none", **overrides}
  )
  model = build_model(config)
  tx = train.make_optimizer(config.train)
  state = train.init_state(model, tx, (16, 16, 16), jax.random.key(0))
  step = jax.jit(train.make_step_fn(config, model, tx, REGIONS))
  return config, model, tx, state, step


def region_loss(model, params, batch):
  targets = losses.labels_to_regions(batch["label"], REGIONS)
  logits = model.apply({"params": params}, batch["pre"], batch["post"])
  return losses.dice_bce_loss(logits, targets)[0]


def test_gradient_accumulation_averages_the_microbatch_gradients():
  # SGD: Adam would turn float noise on zero-gradient parameters into lr-sized differences.
  _, model, tx, state, step = setup(**{"train.grad_accum": 2, "train.optimizer": "sgd"})
  batch = make_batch()
  new_state, metrics = step(state, batch)
  halves = [np.array([0, 2]), np.array([1, 3])]  # microbatch j = rows j, j+2 (documented)
  micro = [{k: v[rows] for k, v in batch.items()} for rows in halves]
  # The reference, compiled once for both microbatches (op by op it is slow on CPU).
  loss_and_grad = jax.jit(jax.value_and_grad(lambda p, m: region_loss(model, p, m)))
  losses_, grads = zip(*(loss_and_grad(state.params, m) for m in micro))
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  updates, _ = tx.update(mean_grads, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  expected_loss = np.mean(losses_)
  np.testing.assert_allclose(float(metrics.compute()["loss"]), expected_loss, rtol=1e-5)


def train_losses(step, state, batch, n):
  out = []
  for _ in range(n):
    state, metrics = step(state, batch)
    out.append(float(metrics.compute()["loss"]))
  return state, np.array(out)


def test_bfloat16_training_tracks_float32():
  batch = make_batch(n=2)
  _, _, _, state32, step32 = setup(**XLA_CONV)
  _, model16, _, state16, step16 = setup(**{"train.compute_dtype": "bfloat16", **XLA_CONV})
  jaxpr = jax.make_jaxpr(lambda p: model16.apply({"params": p}, batch["pre"], batch["post"]))
  convs = [
    e for e in jaxpr(state16.params).jaxpr.eqns if e.primitive.name == "conv_general_dilated"
  ]
  assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)
  state32, l32 = train_losses(step32, state32, batch, 12)
  state16, l16 = train_losses(step16, state16, batch, 12)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state16.params))  # master weights
  assert l32[-1] < l32[0] * 0.9 and l16[-1] < l16[0] * 0.9  # both train
  np.testing.assert_allclose(l16, l32, rtol=0.05)  # and bf16 follows float32


@pytest.mark.parametrize("name", ["resfuse", "a2fnet"])
def test_remat_gives_the_same_gradients_and_recomputes(name):
  batch = make_batch(n=2)
  grads, convs = {}, {}
  for remat in (False, True):
    _, model, _, state, _ = setup(**{"model.name": name, "model.remat": remat, **XLA_CONV})

    def loss(params, model=model):
      return region_loss(model, params, batch)

    grads[remat] = jax.grad(loss)(state.params)
    assert ("remat" in str(jax.make_jaxpr(loss)(state.params))) == remat  # jax.checkpoint
    convs[remat] = str(jax.make_jaxpr(jax.grad(loss))(state.params)).count("conv_general_dilated")
  assert convs[True] > convs[False]  # the encoder's forward convs run again in the backward
  for a, b in zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_nonfinite_step_keeps_the_state_and_names_the_step():
  _, _, _, state, step = setup()
  good = make_batch(n=2)
  state, m1 = step(state, good)
  bad = dict(good, pre=good["pre"].at[0, 0, 0, 0, 0].set(jnp.nan))
  after, m2 = step(state, bad)
  assert int(m1.compute()["nonfinite_step"]) == train.NO_NONFINITE_STEP
  assert int(m2.compute()["nonfinite_step"]) == 2
  assert int(m1.merge(m2).compute()["nonfinite_step"]) == 2
  assert int(after.step) == 2
  for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(a, b)


def test_unknown_compute_dtype_is_an_error():
  with pytest.raises(ValueError, match="train.compute_dtype"):
    setup(**{"train.compute_dtype": "float16"})
