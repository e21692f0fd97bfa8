"""Settings shared by every dataset config, and the one way to find and load a config file.

``resfuse_jax/configs/<dataset>.py`` (shipped in the wheel; ``configs/`` in a checkout links
there) start from ``base_config`` and override what differs. A spec names a file or a shipped
config, then comma-separated args: the first names the model, the rest are options, e.g.
``brats:resfuse,smoke`` or ``configs/brats.py:resfuse,smoke``.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.resources
import importlib.util
import math
import os
from pathlib import Path

import ml_collections

from resfuse_jax.errors import ConfigError

# Config arg -> (model.name, model overrides). Every model and every ResFuse ablation is one
# name, so `compare --models=...` changes exactly one thing between runs.
VARIANTS = {
  "resfuse": ("resfuse", {}),
  "resfuse_identity": ("resfuse", {"fusion": "identity"}),  # Fig. 2b: W_l = P_l
  "resfuse_gate": ("resfuse", {"fusion": "gate"}),
  "resfuse_single_scale": ("resfuse", {"fuse_levels": (0,)}),  # fusion at full resolution only
  "resunet": ("resunet", {}),
  "resunet_early": ("resunet_early", {}),
  "a2fnet": ("a2fnet", {}),
  "tsf_seq2seq": ("tsf_seq2seq", {}),
  "lits": ("lits", {}),
}
MODELS = tuple(VARIANTS)
# The fields of augment.Spec (that module runs on the device; configs only name its settings).
AUGMENT_FIELDS = {
  "p_rotation": float,
  "rotation_degrees": float,
  "p_scale": float,
  "scale_range": tuple,
  "p_noise": float,
  "noise_variance": tuple,
  "p_blur": float,
  "blur_sigma": tuple,
  "p_brightness": float,
  "brightness_range": tuple,
  "p_contrast": float,
  "contrast_range": tuple,
  "p_lowres": float,
  "lowres_zoom": tuple,
  "p_gamma_inverted": float,
  "p_gamma": float,
  "gamma_range": tuple,
  "p_mirror": float,
  "mirror_axes": tuple,
  "crop_zoom": float,
}
OPTIONS = ("smoke",)


def level_strides(strides, levels: int) -> tuple[tuple[int, int, int], ...]:
  """``model.strides`` -> one per-axis triple per encoder level (raises ValueError).

  None is the isotropic U-Net (level 0 keeps the resolution, every further level
  halves each axis); otherwise one triple of 1s and 2s per level, the first (1, 1, 1).
  """
  if strides is None:
    return ((1, 1, 1),) + ((2, 2, 2),) * (levels - 1)
  try:
    out = tuple(tuple(int(v) for v in s) for s in strides)
  except (TypeError, ValueError):
    out = ()
  if (
    len(out) != levels
    or any(len(s) != 3 or any(v not in (1, 2) for v in s) for s in out)
    or out[0] != (1, 1, 1)
  ):
    raise ValueError(
      f"needs one per-axis triple of 1s and 2s per encoder level ({levels}), the first "
      f"(1, 1, 1); got {strides!r}"
    )
  return out


def downsampling(model) -> tuple[int, int, int]:
  """Per axis, the product of a model config's strides: what patch sizes must divide by."""
  levels = level_strides(model.get("strides"), len(model.features))
  return tuple(math.prod(s[a] for s in levels) for a in range(3))


def parse_arg(arg: str | None) -> tuple[str, set[str]]:
  """'resunet,smoke' -> ('resunet', {'smoke'}); the model (variant) defaults to resfuse."""
  parts = [p for p in (arg or "").split(",") if p]
  model = parts[0] if parts and parts[0] in MODELS else "resfuse"
  options = set(parts[1:] if parts and parts[0] in MODELS else parts)
  unknown = options - set(OPTIONS)
  if unknown:
    near = difflib.get_close_matches(sorted(unknown)[0], [*MODELS, *OPTIONS], n=1)
    raise ConfigError(
      f"Unknown config args {sorted(unknown)}"
      + (f" (did you mean {near[0]!r}?)" if near else "")
      + f"; the first arg is a model ({', '.join(MODELS)}), "
      f"the rest options ({', '.join(OPTIONS)})"
    )
  return model, options


def add_input_limits(data: ml_collections.ConfigDict) -> None:
  """What a scan's header may claim before any voxel is read (``data.common.InputLimits``).

  The defaults admit any BraTS or breast scan with a wide margin (512³ voxels, 2 GiB).
  """
  data.max_voxels = 2**27  # per scan, also after resampling to target_spacing
  data.max_bytes = 2**31  # in memory, per scan
  data.spacing_range = (0.05, 20.0)  # mm, per axis


def base_config(variant: str) -> ml_collections.ConfigDict:
  """Every key a run reads, at its default: configs override, ``fill_defaults`` completes."""
  if variant not in VARIANTS:
    raise ConfigError(f"Unknown model {variant!r}; choose from {', '.join(MODELS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = _model_section(variant)
  c.data = _data_section()
  c.train = _train_section()
  c.eval = _eval_section()
  c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "keep": 2})
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: every device the spatial axis leaves
  c.mesh.spatial = 1  # devices splitting the depth axis of each patch (for very large patches)
  return c


def _model_section(variant: str) -> ml_collections.ConfigDict:
  name, overrides = VARIANTS[variant]
  m = ml_collections.ConfigDict()
  m.name = name
  m.variant = variant  # the label in results.json and comparison tables
  m.features = (16, 32, 64, 128, 256)
  m.fusion = "conv"  # identity | conv | gate (ResFuse only)
  m.fuse_levels = ml_collections.FieldReference(None, field_type=tuple)
  m.remat = False  # recompute encoder levels in the backward pass (less memory)
  # Pooling per encoder level and axis: None = isotropic (level 0 keeps the resolution, each
  # further level halves every axis), else one triple of 1s and 2s per level (array axes, RAS), the
  # first (1, 1, 1); `python -m resfuse_jax.plan` chooses it from the data's spacing.
  m.strides = ml_collections.FieldReference(None, field_type=tuple)
  # 3D convolutions: auto (2D planes on CPU, XLA's 3D conv elsewhere) | xla | planes. The
  # environment variable is read here, once, so the choice lands in W/config.json.
  m.conv_impl = os.environ.get("RESFUSE_CONV_IMPL", "auto")
  # Stride-2 convs: auto | space_to_depth | strided; transposed convs: auto | depth_to_space |
  # transpose; XLA's GPU conv layout: auto | default | nhwc | nchw (set before JAX starts).
  # auto = the backend's default (resfuse_jax/backend.py); all choices share the parameters.
  m.downsample = "auto"
  m.upsample = "auto"
  m.conv_layout = "auto"
  for key, value in overrides.items():
    m[key] = value
  return m


def _data_section() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.name = ""
  d.root = ""
  d.patch_size = (128, 128, 128)
  d.fold = 0
  d.num_folds = 5
  d.split_seed = 12345
  d.fg_fraction = 1.0 / 3.0
  d.workers = 0  # Grain worker processes; 0 = in the main process
  d.read_threads = 8  # threads cutting crops (per process)
  d.prefetch = 16  # crops held ready ahead of the step (each 206³ crop is 79 MB)
  # Where training's crops come from: "device" = the whole training set in accelerator memory,
  # crops drawn and cut inside the jitted step (train/resident.py); "host" = the Grain pipeline;
  # "auto" = the backend's column (backend.py: device on a GPU, host on the CPU), device only
  # when the packed set fits resident_memory_fraction of a device's memory.
  d.resident = "auto"
  d.resident_dtype = "float32"  # storage of the resident scans: float32 | bfloat16
  # "replicated" = every device holds the whole set (a row's crop is the same on any number
  # of devices); "sharded" = the cases dealt over the mesh's data axis, each process loading
  # only its devices' share; "auto" = replicated when it fits, else sharded.
  d.resident_layout = "auto"
  d.resident_memory_fraction = 0.4
  # Preprocessing (changing any of these builds a new cache, keyed by their hash).
  d.target_spacing = ml_collections.FieldReference(None, field_type=tuple)  # mm; None = keep
  d.normalization = "zscore"  # zscore (per scan) | joint (pre's statistics for both)
  d.affine_tolerance = 1e-3  # mm: pre/post/label affines may differ by this much
  d.cache_dir = ""  # "" = $RESFUSE_CACHE/preprocessed (~/.cache/resfuse_jax/preprocessed)
  d.preprocess_workers = 2
  d.on_bad_case = "error"  # error | skip (skipped cases go to W/bad_cases.json)
  add_input_limits(d)
  # Augmentation runs on the device, inside the jitted step (resfuse_jax/augment.py): a preset
  # (nnunet | light | none), then any field set here overrides it, e.g.
  # --config.data.augment.p_rotation=0.5. The host only crops with the margin it needs.
  d.augment = ml_collections.ConfigDict({"preset": "nnunet"})
  for name, kind in AUGMENT_FIELDS.items():
    d.augment[name] = ml_collections.config_dict.placeholder(kind)
  return d


def _train_section() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.steps = 100_000
  t.batch_size = 2
  t.optimizer = "adamw"
  t.lr = 1e-3
  t.warmup_steps = 1000
  t.weight_decay = 1e-5
  t.grad_clip = 1.0
  t.aux_loss_weight = 1.0  # per auxiliary output (A2FNet, TSF-Seq2Seq, LiTS)
  # auto | float32 | bfloat16; auto is the backend's default (resfuse_jax/backend.py: float32 on
  # CPU, bfloat16 on GPU). Parameters and Adam state stay float32.
  t.compute_dtype = "auto"
  t.grad_accum = 1  # microbatches per step: the global batch is split this many ways
  t.log_every = 100
  return t


def _eval_section() -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.every_steps = 5000
  e.overlap = 0.5
  e.batch_size = 0  # sliding windows per forward call; 0 = the backend's default
  e.max_cases = 0  # 0 = every validation case
  e.thresholds = ml_collections.FieldReference(None, field_type=tuple)  # per region; 0.5
  e.min_component_voxels = 0  # predict: drop smaller connected components per region
  return e


def fill_defaults(config, added_later: dict | None = None) -> ml_collections.ConfigDict:
  """A config (or its dict, e.g. an older ``config.json``) with every missing key filled.

  Missing keys take ``base_config``'s value for the config's model variant, or, per
  dataset, ``added_later[data.name]`` (dataset keys added after runs were written).
  Keys the config has are kept as they are.
  """
  saved = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  model = saved.get("model", {})
  variant = model.get("variant", model.get("name", "resfuse"))
  filled = base_config(variant).to_dict()
  dataset = saved.get("data", {}).get("name", "")
  _merge_into(filled, (added_later or {}).get(dataset, {}))
  _merge_into(filled, saved)
  return ml_collections.ConfigDict(filled)


def _merge_into(base: dict, top: dict) -> None:
  for key, value in top.items():
    if isinstance(value, dict) and isinstance(base.get(key), dict):
      _merge_into(base[key], value)
    else:
      base[key] = value


def apply_dce_defaults(c: ml_collections.ConfigDict) -> None:
  """Breast DCE-MRI and most in-house collections: anisotropic, scanner-dependent spacing."""
  c.data.target_spacing = (1.0, 1.0, 1.0)  # resample every case to one grid
  c.data.patch_size = (128, 128, 64)
  c.model.features = (16, 32, 64, 128, 256)


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """A few steps of a tiny model: for tests and for checking an installation."""
  c.model.features = (4, 8)
  c.data.patch_size = (16, 16, 16)
  c.train.steps = 4
  c.train.warmup_steps = 1
  c.train.log_every = 2
  c.eval.every_steps = 4
  c.eval.max_cases = 2
  c.checkpoint.every_steps = 2


def lookup(config, key: str) -> tuple[object, str]:
  """``'data.augment.preset'`` -> (the ``data.augment`` node, ``'preset'``); ``KeyError``
  (with the dotted key) when a parent is missing. The one walk over dotted config keys."""
  *parents, leaf = key.split(".")
  node = config
  try:
    for p in parents:
      node = node[p]
  except (KeyError, AttributeError, TypeError):
    raise KeyError(key) from None
  return node, leaf


def get_path(config, key: str):
  """The value at a dotted key; ``KeyError`` naming it when absent."""
  node, leaf = lookup(config, key)
  try:
    return node[leaf]
  except (KeyError, AttributeError, TypeError):
    raise KeyError(key) from None


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """{'train.steps': 50, ...} -> set in place (what `--config.train.steps=50` does)."""
  for key, value in overrides.items():
    try:
      node, leaf = lookup(c, key)
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      raise ConfigError(f"cannot set config.{key}={value!r}: {e}") from None
  return c


def shipped_configs() -> dict[str, Path]:
  """Name -> file of the configs inside the package, found where the package is installed."""
  folder = Path(str(importlib.resources.files("resfuse_jax") / "configs"))
  return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def resolve_spec(spec: str) -> str:
  """``'phantom:smoke'`` -> ``'<package>/configs/phantom.py:smoke'``: the one place names resolve.

  An existing file wins (``configs/brats.py``, a user's ``my.py``, even a file named ``phantom``
  in the working folder); else a bare name, with or without ``.py``, of a shipped config; else a
  ``ConfigError`` naming the spec and the shipped names. The args after ':' are kept as given.
  """
  path, colon, arg = spec.partition(":")
  if Path(path).is_file():
    return spec
  shipped = shipped_configs()
  name = path.removesuffix(".py")
  if name in shipped and "/" not in path and os.sep not in path:
    return f"{shipped[name]}{colon}{arg}"
  raise ConfigError(
    f"config {spec!r} not found: no such file, and no shipped config of that name "
    f"({', '.join(shipped)})"
  )


def load(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """``'phantom:resunet,smoke'`` or ``'configs/phantom.py:...'`` -> ``get_config(arg)`` + overrides.

  The command-line flag ``--config`` (``cli.define_config_flag``) resolves and loads the
  same way; this is for code that builds configs itself (compare, tests, benchmarks).
  """
  path, _, arg = resolve_spec(spec).partition(":")
  name = f"_resfuse_config_{Path(path).stem}"
  # Any file name, as the flag's loader reads it (a config file need not end in .py).
  loader = importlib.machinery.SourceFileLoader(name, path)
  module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{path} defines no get_config(arg)")
  return apply_overrides(module.get_config(arg or None), overrides or {})


def with_model(spec: str, variant: str) -> str:
  """The same config spec with its model replaced and its options kept."""
  path, _, arg = spec.partition(":")
  if variant not in MODELS:
    raise ConfigError(f"Unknown model {variant!r}; choose from {', '.join(MODELS)}")
  _, options = parse_arg(arg)
  return f"{path}:{','.join([variant, *sorted(options)])}"
