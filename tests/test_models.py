import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resfuse_jax import config_lib, models
from resfuse_jax.errors import ConfigError
from resfuse_jax.models import convolution, layers, resfuse

FEATURES = (4, 8, 16)


def build(name, fusion="conv", features=FEATURES, fuse_levels=None, **model_config):
  cfg = config_lib.base_config("resfuse").model  # every key at its default, then:
  cfg.update({"name": name, "features": features, "fusion": fusion, "fuse_levels": fuse_levels})
  cfg.update(model_config)  # e.g. conv_impl, remat
  return models.build(cfg, num_outputs=3)


def init(model, shape=(2, 16, 16, 16, 1)):
  x = jnp.zeros(shape)
  return model.init(jax.random.key(0), x, x)["params"]


@pytest.mark.parametrize("name", ["resfuse", "resunet", "resunet_early"])
def test_output_shape(name):
  model = build(name)
  params = init(model)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 16, 1))
  y = model.apply({"params": params}, x, x)
  assert y.shape == (2, 16, 16, 16, 3) and y.dtype == jnp.float32


def test_unknown_model_lists_registered_names():
  with pytest.raises(
    ConfigError, match="Unknown model.name 'unet9000'; registered models: .*resfuse.*resunet"
  ):
    build("unet9000")


def test_unknown_conv_impl_is_a_config_error():
  with pytest.raises(ConfigError, match="model.conv_impl must be one of auto, xla, planes"):
    build("resfuse", conv_impl="fast")


def test_conv_plan_defaults_to_auto_resolved_for_this_backend():
  plan = build("resfuse").conv_impl
  assert plan == convolution.resolve_conv_plan(config_lib.base_config("resfuse").model)
  assert plan.conv == convolution.resolve_conv_impl("auto")
  assert build("resunet", conv_impl="xla").conv_impl.conv == "xla"
  chosen = build("resunet", downsample="strided", upsample="transpose").conv_impl
  assert (chosen.downsample, chosen.upsample) == ("strided", "transpose")


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("downsample", "pool", "model.downsample must be one of auto, space_to_depth, strided"),
    ("upsample", "nearest", "model.upsample must be one of auto, depth_to_space, transpose"),
  ],
)
def test_unknown_conv_plan_choices_are_config_errors(field, value, message):
  with pytest.raises(ConfigError, match=message):
    build("resfuse", **{field: value})


@pytest.mark.parametrize("name", ["resfuse", "lits"])
def test_every_conv_plan_has_the_same_parameters_and_outputs(name):
  """XLA's strided and transposed convs compute what the space/depth rewrites compute."""
  x = jax.random.normal(jax.random.key(2), (1, 8, 8, 8, 1))
  ref = build(name, features=(4, 8), conv_impl="xla")
  params = init(ref, x.shape)
  expected = ref.apply({"params": params}, x, 1.5 * x, mutable=["aux_logits"])
  other = build(name, features=(4, 8), conv_impl="xla", downsample="strided", upsample="transpose")
  assert jax.tree.map(jnp.shape, init(other, x.shape)) == jax.tree.map(jnp.shape, params)
  got = other.apply({"params": params}, x, 1.5 * x, mutable=["aux_logits"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def conv3_impls(model, params, x):
  """The ``conv_impl`` of every Conv3 called while applying ``model``."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Conv3) and context.method_name == "__call__":
      seen.append(convolution.as_plan(context.module.conv_impl).conv)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    out = model.apply({"params": params}, x, 1.5 * x, mutable=["aux_logits"])
  return out, seen


@pytest.mark.parametrize("name", models.names())
def test_conv_impls_reach_every_conv_and_give_the_same_outputs(name):
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 8, 1))
  xla, planes = (build(name, features=(4, 8), conv_impl=impl) for impl in ("xla", "planes"))
  params = init(xla, x.shape)
  assert jax.tree.map(jnp.shape, init(planes, x.shape)) == jax.tree.map(jnp.shape, params)
  ref, ref_impls = conv3_impls(xla, params, x)
  ours, our_impls = conv3_impls(planes, params, x)
  assert ref_impls and set(ref_impls) == {"xla"} and set(our_impls) == {"planes"}
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_count_params_matches_a_hand_count():
  unit = layers.ResidualUnit(4, strides=2)  # 2 -> 4 channels: every parameter kind
  x = jnp.zeros((1, 4, 4, 4, 2))
  params = unit.init(jax.random.key(0), x)["params"]
  norm = lambda c: 2 * c  # noqa: E731  (scale, bias)
  expected = (
    norm(2)  # norm_in
    + 27 * 2 * 4 + 4  # conv_a, with bias
    + norm(4)  # norm_mid
    + 27 * 4 * 4 + 4  # conv_b, with bias
    + 2 * 4 + norm(4)  # projection: conv1 without bias, norm
  )  # fmt: skip
  assert models.count_params(params) == expected == 684
  assert type(models.count_params(params)) is int
  assert models.count_params(jax.eval_shape(unit.init, jax.random.key(0), x)) == expected
  assert models.count_params({}) == 0


@pytest.mark.parametrize(
  "name,fuse_levels,remat,shapes",
  [
    ("resfuse", None, False, [(1, 8, 8, 8, 4), (1, 4, 4, 4, 8)]),
    ("resfuse", None, True, [(1, 8, 8, 8, 4), (1, 4, 4, 4, 8)]),
    ("resfuse", (0,), False, [(1, 8, 8, 8, 4)]),
    ("resfuse", (1,), False, [(1, 4, 4, 4, 8)]),
    ("resunet", None, False, []),
  ],
)
def test_fusion_terms_are_one_leaf_per_fused_level(name, fuse_levels, remat, shapes):
  model = build(name, features=(4, 8), fuse_levels=fuse_levels, remat=remat)
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 8, 1))
  params = init(model, x.shape)
  _, sown = model.apply({"params": params}, x, x, mutable=[models.FUSION_TERMS])
  terms = jax.tree.leaves(sown.get(models.FUSION_TERMS, {}))
  assert [t.shape for t in terms] == shapes  # [B, d, h, w, C] per fused level, in level order


def test_unknown_fusion_is_an_error():
  with pytest.raises(ValueError, match="model.fusion"):
    init(build("resfuse", fusion="attention"))


def fusion_param_count(features, fusion, in_channels=1):
  """W_l's parameters, counted from the paper's definition, not from the model."""
  total, c_in = 0, in_channels
  for f in features:
    if fusion == "conv":  # 1x1x1 conv a_l -> f channels, with bias
      total += c_in * f + f
    elif fusion == "gate":  # 1x1x1 conv [m_l, a_l] -> f gate channels, with bias
      total += 2 * c_in * f + f
    c_in = f
  return total


@pytest.mark.parametrize("fusion", ["identity", "conv", "gate"])
def test_resfuse_adds_exactly_the_fusion_parameters(fusion):
  extra = models.count_params(init(build("resfuse", fusion))) - models.count_params(
    init(build("resunet"))
  )
  assert extra == fusion_param_count(FEATURES, fusion)
  assert fusion != "identity" or extra == 0


def test_fuse_levels_ablation_drops_fusion_parameters():
  full = models.count_params(init(build("resfuse")))
  partial = models.count_params(init(build("resfuse", fuse_levels=(0,))))
  assert full - partial == fusion_param_count(FEATURES[1:], "conv", in_channels=FEATURES[0])


def test_encoder_has_one_parameter_set_for_both_branches():
  params = init(build("resfuse"))
  for level in range(len(FEATURES)):
    names = set(params["encoder"][f"level{level}"])
    assert names == {"residual", "projection", "fusion"}, names
  # Same encoder parameter shapes and count as the single-branch ResUNet: no second copy.
  resunet_enc = init(build("resunet"))["encoder"]
  ours = {k: {n: v for n, v in lv.items() if n != "fusion"} for k, lv in params["encoder"].items()}
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, resunet_enc)


def one_level(fusion, conv_impl="xla"):
  enc = resfuse.ResFuseEncoder(features=(6,), fusion=fusion, conv_impl=conv_impl)
  m = jax.random.normal(jax.random.key(1), (2, 8, 8, 8, 1))
  a = jax.random.normal(jax.random.key(2), (2, 8, 8, 8, 1)) * 0.5 + 0.3
  params = enc.init(jax.random.key(3), m, a)["params"]
  return enc, params, m, a


@pytest.mark.parametrize("fusion", ["conv", "identity", "gate"])
def test_one_level_main_branch_is_F_of_main_plus_W_of_aux(fusion):
  enc, params, m, a = one_level(fusion)
  (main_out,) = enc.apply({"params": params}, m, a)
  p = params["level0"]
  F = layers.ResidualBranch(6, strides=1, preactivate=False)
  P = layers.Projection(6, strides=1)
  f_m = F.apply({"params": p["residual"]}, m)
  p_a = P.apply({"params": p["projection"]}, a)
  if fusion == "conv":
    w_a = a @ p["fusion"]["conv"]["dense"]["kernel"] + p["fusion"]["conv"]["dense"]["bias"]
  elif fusion == "identity":
    w_a = p_a
  else:
    g = p["fusion"]["gate"]["dense"]
    w_a = nn.sigmoid(jnp.concatenate([m, a], -1) @ g["kernel"] + g["bias"]) * p_a
  np.testing.assert_allclose(main_out, f_m + w_a, rtol=1e-5, atol=1e-5)
  # And the main branch really uses the aux scan: changing it changes the output.
  (changed,) = enc.apply({"params": params}, m, a + 1.0)
  assert not np.allclose(changed, main_out)


def test_aux_branch_is_an_ordinary_residual_unit_with_the_shared_weights():
  _, params, m, a = one_level("conv")
  level = resfuse.ResFuseLevel(6, strides=1, preactivate=False, fusion="conv")
  _, aux_out = level.apply({"params": params["level0"]}, m, a)
  unit = layers.ResidualUnit(6, strides=1, preactivate=False)
  shared = {k: params["level0"][k] for k in ("residual", "projection")}
  np.testing.assert_allclose(aux_out, unit.apply({"params": shared}, a), rtol=1e-5, atol=1e-5)


def test_both_branches_share_one_batched_convolution_call():
  enc, params, m, a = one_level("conv", conv_impl="xla")  # one 3D conv primitive per layer
  jaxpr = jax.make_jaxpr(lambda p: enc.apply({"params": p}, m, a))(params)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 2  # conv_a and conv_b of F, each once, on the stacked [2B] batch
  assert all(e.invars[0].aval.shape[0] == 2 * m.shape[0] for e in convs)
