"""Device-side augmentation: identities, alignment, the enhancement's sign, determinism."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resfuse_jax import augment, config_lib
from resfuse_jax.errors import ConfigError

NNUNET = augment.PRESETS["nnunet"]
PATCH = (12, 12, 12)
NONE = augment.PRESETS["none"]


def only(name: str, **extra) -> augment.Spec:
  """A spec with one transform always on."""
  return dataclasses.replace(NONE, **{name: 1.0}, **extra)


def random_sample(shape, seed=0, enhancement="signed"):
  """pre ~ N(0, 1); post = pre + enhancement, signed or >= 0; labels 0..3."""
  rng = np.random.default_rng(seed)
  pre = rng.normal(size=(*shape, 1)).astype(np.float32)
  delta = rng.normal(size=pre.shape).astype(np.float32)
  if enhancement == "nonnegative":
    delta = np.abs(delta)
  label = rng.integers(0, 4, size=shape).astype(np.uint8)
  return {"pre": pre, "post": pre + delta, "label": label}


@functools.cache
def applier(spec: augment.Spec, patch=PATCH):
  return jax.jit(lambda p, s: augment.apply(spec, p, s, patch))


def with_params(**values):
  p = augment.identity_params()
  return {**p, **{k: jnp.asarray(v, p[k].dtype) for k, v in values.items()}}


def centre(x, patch=PATCH):
  start = [(n - p) // 2 for n, p in zip(x.shape, patch)]
  return x[tuple(slice(s, s + p) for s, p in zip(start, patch))]


def test_identity_parameters_give_the_centre_of_the_crop_bit_for_bit():
  crop = NNUNET.crop_shape(PATCH)
  assert crop == (20, 20, 20)
  sample = random_sample(crop)
  out = applier(NNUNET)(augment.identity_params(), sample)
  for key in ("pre", "post", "label"):
    np.testing.assert_array_equal(np.asarray(out[key]), centre(sample[key]))


@pytest.mark.parametrize(
  "spec, params, exact",
  [
    (only("p_rotation"), {"angles": [0.0, 0.0, 0.0]}, True),
    (only("p_scale"), {"zoom": 1.0}, True),
    (only("p_noise"), {"noise": True, "noise_sigma": 0.0}, True),
    (only("p_blur"), {"blur": True, "blur_sigma": [0.05] * 3}, False),
    (only("p_brightness"), {"brightness": 1.0}, True),
    (only("p_contrast"), {"contrast": True, "contrast_factor": 1.0}, False),
    (only("p_lowres"), {"lowres": True, "lowres_zoom": 1.0}, True),
    (only("p_gamma"), {"gamma": True, "gamma_value": 1.0}, False),
    (only("p_gamma_inverted"), {"gamma_inverted": True, "gamma_inverted_value": 1.0}, False),
    (only("p_mirror"), {"mirror": [False] * 3}, True),
  ],
  ids=lambda v: v if isinstance(v, bool) else None,
)
def test_each_transform_applied_with_its_identity_value_is_the_identity(spec, params, exact):
  sample = random_sample(spec.crop_shape(PATCH), seed=1)
  out = applier(spec)(with_params(**params), sample)
  for key in ("pre", "post"):
    expected = centre(sample[key])
    if exact:
      np.testing.assert_array_equal(np.asarray(out[key]), expected)
    else:
      np.testing.assert_allclose(np.asarray(out[key]), expected, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(out["label"]), centre(sample["label"]))


def test_a_90_degree_rotation_is_rot90():
  sample = random_sample(PATCH, seed=2)  # crop = patch: rotation about the common centre
  out = applier(only("p_rotation"))(with_params(angles=[0.0, 0.0, np.pi / 2]), sample)
  expected = {k: np.rot90(v, -1, axes=(0, 1)) for k, v in sample.items()}
  np.testing.assert_array_equal(np.asarray(out["label"]), expected["label"])
  np.testing.assert_allclose(np.asarray(out["post"]), expected["post"], atol=1e-5)
  out = applier(only("p_rotation"))(with_params(angles=[-np.pi / 2, 0.0, 0.0]), sample)
  np.testing.assert_array_equal(np.asarray(out["label"]), np.rot90(sample["label"], 1, axes=(1, 2)))


def test_mirroring_flips_scans_and_label_together():
  sample = random_sample(PATCH, seed=3)
  out = applier(only("p_mirror"))(with_params(mirror=[True, False, True]), sample)
  for key in ("pre", "post", "label"):
    np.testing.assert_array_equal(np.asarray(out[key]), np.flip(sample[key], (0, 2)))


def coded_sample(shape):
  """Labels in 4^3 blocks; pre = label + 1 and post = 2 pre + 1: alignment checkable per voxel."""
  rng = np.random.default_rng(4)
  blocks = rng.integers(0, 4, size=[-(-n // 4) for n in shape]).astype(np.uint8)
  label = blocks.repeat(4, 0).repeat(4, 1).repeat(4, 2)[: shape[0], : shape[1], : shape[2]]
  pre = (label.astype(np.float32) + 1.0)[..., None]
  return {"pre": pre, "post": 2 * pre + 1, "label": label}


def test_rotation_zoom_and_mirroring_keep_pre_post_and_label_aligned():
  spec = dataclasses.replace(NONE, p_rotation=1.0, p_scale=1.0, p_mirror=0.5)
  patch = (16, 16, 16)
  crop = spec.crop_shape(patch)
  sample = coded_sample(crop)
  batch = {k: np.stack([v] * 6) for k, v in sample.items()}
  keys = augment.sample_keys(0, jnp.asarray(7), 6)
  warp = jax.jit(lambda b, k: augment.augment_batch(spec, b, k, patch))
  out = warp(batch, keys)
  pre, post, label = (np.asarray(out[k]) for k in ("pre", "post", "label"))
  pre, post = pre[..., 0], post[..., 0]
  # The same draws on a crop of ones: each voxel's interpolation weight inside the crop
  # (a zoom-out below crop_zoom, or three large rotations at once, reads zeros beyond it,
  # as nnU-Net's does).
  ones = {**batch, "pre": np.ones_like(batch["pre"])}
  inside_weight = np.asarray(warp(ones, keys)["pre"])[..., 0]
  assert pre.shape == (6, *patch) and label.shape == (6, *patch)
  assert not np.array_equal(label[0], centre(sample["label"], patch))  # something moved
  # One warp for both scans: post = 2 pre + 1 read through the same weights, everywhere.
  np.testing.assert_allclose(post, 2 * pre + inside_weight, atol=1e-4)
  inside = inside_weight > 1 - 1e-4
  assert inside.mean() > 0.9
  # Where the scan's interpolated code is an integer (inside a block), the label is that code.
  interior = inside & (np.abs(pre - np.round(pre)) < 1e-3)
  assert interior.sum() > 2000
  assert (label[interior] + 1 == np.round(pre[interior])).mean() > 0.99


@pytest.mark.parametrize(
  "name", ["p_noise", "p_brightness", "p_contrast", "p_gamma", "p_gamma_inverted"]
)
def test_pointwise_intensity_transforms_keep_the_sign_of_the_enhancement(name):
  spec = only(name)
  f = jax.jit(jax.vmap(lambda key, s: augment.apply(spec, augment.draw(spec, key), s, PATCH)))
  sample = random_sample(PATCH, seed=5)
  batch = {k: np.stack([v] * 8) for k, v in sample.items()}
  out = f(augment.sample_keys(1, jnp.asarray(0), 8), batch)
  before = np.broadcast_to(sample["post"] - sample["pre"], (8, *PATCH, 1))
  after = np.asarray(out["post"] - out["pre"])
  assert not np.allclose(np.asarray(out["pre"]), batch["pre"])  # the transform did act
  clear = np.abs(before) > 1e-3
  assert np.all(np.sign(after[clear]) * np.sign(before[clear]) >= 0)  # never flipped
  assert np.mean(np.sign(after[clear]) == np.sign(before[clear])) > 0.99
  if name == "p_noise":  # one field for both scans: the difference is untouched
    np.testing.assert_allclose(after, before, atol=1e-5)


@pytest.mark.parametrize("name", ["p_blur", "p_lowres"])
def test_smoothing_transforms_keep_a_nonnegative_enhancement_nonnegative(name):
  spec = only(name)
  f = jax.jit(jax.vmap(lambda key, s: augment.apply(spec, augment.draw(spec, key), s, PATCH)))
  sample = random_sample(PATCH, seed=6, enhancement="nonnegative")
  batch = {k: np.stack([v] * 8) for k, v in sample.items()}
  out = f(augment.sample_keys(2, jnp.asarray(0), 8), batch)
  assert not np.allclose(np.asarray(out["pre"]), batch["pre"])
  assert np.asarray(out["post"] - out["pre"]).min() > -1e-5


@pytest.fixture(scope="module")
def nnunet_batches():
  crop = NNUNET.crop_shape(PATCH)
  sample = random_sample(crop, seed=7)
  batch = {k: np.stack([v] * 8) for k, v in sample.items()}
  f = jax.jit(
    lambda b, step: augment.augment_batch(NNUNET, b, augment.sample_keys(3, step, 8), PATCH)
  )
  return f, batch


def test_the_same_key_gives_the_same_batch_and_rows_get_their_own_draws(nnunet_batches):
  f, batch = nnunet_batches
  a, b, c = f(batch, jnp.asarray(5)), f(batch, jnp.asarray(5)), f(batch, jnp.asarray(6))
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  rows = np.asarray(a["post"]).reshape(8, -1)
  assert len({r.tobytes() for r in rows}) == 8  # eight identical inputs, eight different outputs
  assert not np.array_equal(np.asarray(a["post"]), np.asarray(c["post"]))


def test_a_rows_draw_depends_on_seed_step_and_row_only():
  keys8 = augment.sample_keys(3, jnp.asarray(5), 8)
  keys4 = augment.sample_keys(3, jnp.asarray(5), 4)
  np.testing.assert_array_equal(jax.random.key_data(keys8[:4]), jax.random.key_data(keys4))


def test_crop_shape_follows_nnunets_patch_size_rule():
  # nnU-Net's get_patch_size: 128 * (cos 30° + sin 30°) / 0.85 = 205.7.
  assert NNUNET.crop_shape((128, 128, 128)) == (206, 206, 206)
  # Depth 64: its largest box is 128 sin 30° + 64 cos 30° = 119.4 -> 140.5 -> 141, +1 for an
  # even margin.
  assert NNUNET.crop_shape((128, 128, 64)) == (206, 206, 142)
  for preset in ("light", "none"):
    assert augment.PRESETS[preset].crop_shape((24, 24, 24)) == (24, 24, 24)


def augment_config(**values):
  cfg = config_lib.load("configs/brats.py").data.augment
  for k, v in values.items():
    cfg[k] = v
  return cfg


def test_config_selects_a_preset_and_overrides_single_fields():
  assert config_lib.load("configs/brats.py").data.augment.preset == "nnunet"
  assert config_lib.load("configs/phantom.py").data.augment.preset == "light"
  assert augment.spec_from_config(augment_config()) == NNUNET
  spec = augment.spec_from_config(augment_config(preset="light", p_rotation=0.5))
  assert spec.p_rotation == 0.5 and spec.p_mirror == 0.5 and spec.p_noise == 0.0
  assert set(config_lib.AUGMENT_FIELDS) == set(augment.FIELDS)


@pytest.mark.parametrize(
  "values, message",
  [
    ({"preset": "heavy"}, "preset must be one of none, light, nnunet"),
    ({"p_blur": 1.5}, "p_blur must be a probability"),
    ({"scale_range": (1.4, 0.7)}, "scale_range must be"),
    ({"mirror_axes": (0, 3)}, "mirror_axes"),
  ],
)
def test_bad_augmentation_settings_are_config_errors(values, message):
  with pytest.raises(ConfigError, match=message):
    augment.spec_from_config(augment_config(**values))


def test_unknown_augmentation_field_is_a_config_error():
  cfg = ml_collections.ConfigDict({"preset": "none", "rot90": True})
  with pytest.raises(ConfigError, match="unknown fields \\['rot90'\\]"):
    augment.spec_from_config(cfg)


def test_the_train_step_with_augmentation_lowers_for_cuda():
  """The GPU path compiles from this machine: the jitted step, nnU-Net's set inside, bf16."""
  from conftest import smoke_config

  from resfuse_jax import train
  from resfuse_jax.task import build_model

  config = smoke_config(
    **{
      "data.augment.preset": "nnunet",
      "model.conv_impl": "xla",  # the GPU column of resfuse_jax/backend.py
      "train.compute_dtype": "bfloat16",
    }
  )
  model, tx = build_model(config), train.make_optimizer(config.train)
  patch = tuple(config.data.patch_size)
  state = jax.eval_shape(functools.partial(train.init_state, model, tx, patch), jax.random.key(0))
  step = jax.jit(train.make_step_fn(config, model, tx, ((1, 2, 3), (1, 3), (3,))))
  exported = jax.export.export(step, platforms=["cuda"])(state, train.input_shapes(config))
  assert exported.platforms == ("cuda",)
  text = exported.mlir_module()
  assert "stablehlo.convolution" in text and "stablehlo.gather" in text  # model and warp
  assert exported.in_avals[-1].shape == (2, *NNUNET.crop_shape(patch), 1)  # host crops of pre
