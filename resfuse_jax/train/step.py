"""The pure training step and the ONE factory that assembles it from a config.

``train_step(state, batch, ...)`` is a pure function: augmentation on the device
(per-row keys), the loss, gradients (optionally averaged over microbatches in a
scan), the update, and a gate that drops any step whose loss or gradient is not
finite. ``make_step_fn`` / ``compile_train_step`` bind it to a config's parts;
training, the benchmarks and the GPU check all go through them.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics

from resfuse_jax import augment, losses, sharding
from resfuse_jax.errors import ConfigError
from resfuse_jax.task import Task
from resfuse_jax.train import resident


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


NO_NONFINITE_STEP = np.iinfo(np.int32).max


@flax.struct.dataclass
class FirstNonFiniteStep(clu_metrics.Metric):
  """The first step whose loss or gradient was not finite (``NO_NONFINITE_STEP`` if none)."""

  value: jax.Array

  @classmethod
  def from_model_output(cls, nonfinite_step: jax.Array, **_) -> "FirstNonFiniteStep":
    return cls(value=nonfinite_step)

  def merge(self, other: "FirstNonFiniteStep") -> "FirstNonFiniteStep":
    return type(self)(value=jnp.minimum(self.value, other.value))

  def compute(self) -> jax.Array:
    return self.value


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  nonfinite_step: FirstNonFiniteStep
  loss: clu_metrics.Average.from_output("loss")
  dice_loss: clu_metrics.Average.from_output("dice_loss")
  bce_loss: clu_metrics.Average.from_output("bce_loss")
  aux_loss: clu_metrics.Average.from_output("aux_loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Linear warm-up then cosine (adamw) or polynomial (sgd, nnU-Net) decay, with clipping."""
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  if cfg.optimizer == "adamw":
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), end_value=cfg.lr * 0.01
    )
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif cfg.optimizer == "sgd":
    schedule = optax.join_schedules(
      [
        optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
        optax.polynomial_schedule(cfg.lr, 0.0, 0.9, max(cfg.steps - warmup, 1)),
      ],
      [max(warmup, 1)],
    )
    opt = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay), optax.sgd(schedule, 0.99, nesterov=True)
    )
  else:
    raise ConfigError(f"train.optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)


def _microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
  """[B, ...] -> [n, B/n, ...], microbatch j = rows j, j+n, ...: each device keeps its rows."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def _loss_fn(model: nn.Module, regions, aux_loss_weight: float) -> Callable:
  """(params, batch) -> (loss, its parts): the main output's loss plus every auxiliary one's."""

  def loss_fn(params, micro):
    targets = losses.labels_to_regions(micro["label"], regions)
    logits, sown = model.apply(
      {"params": params}, micro["pre"], micro["post"], mutable=["aux_logits"]
    )
    aux = jax.tree.leaves(sown.get("aux_logits", {}))
    return losses.total_loss(logits, aux, targets, aux_loss_weight)

  return loss_fn


def _gradients(loss_fn: Callable, params, batch, grad_accum: int):
  """((loss, parts), grads), averaged over ``grad_accum`` microbatches by a scan.

  The scan keeps one microbatch's activations alive at a time.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    return grad_fn(params, batch)

  def accumulate(total, micro):
    return jax.tree.map(jnp.add, total, grad_fn(params, micro)), None

  micro = _microbatches(batch, grad_accum)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first))
  total, _ = jax.lax.scan(accumulate, zeros, micro)
  return jax.tree.map(lambda x: x / grad_accum, total)


def _update_if_finite(state: TrainState, tx, grads, finite: jax.Array) -> TrainState:
  """The optimiser's update, or params and optimiser state unchanged when not ``finite``."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep_if_bad = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  return state.replace(
    step=state.step + 1,
    params=keep_if_bad(params, state.params),
    opt_state=keep_if_bad(opt_state, state.opt_state),
  )


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  regions: tuple[tuple[int, ...], ...],
  aux_loss_weight: float = 1.0,
  grad_accum: int = 1,
  augmentation: augment.Spec | None = None,
  patch_size: tuple[int, ...] | None = None,
  seed: int = 0,
  batch_sharding: jax.sharding.Sharding | None = None,
  sampler: Callable | None = None,
  global_batch: int = 0,
) -> tuple[TrainState, TrainMetrics]:
  """One optimisation step on a global batch {'pre','post': [B,*crop,1], 'label': [B,*crop]}.

  With ``augmentation``, the host crops are first augmented and cut to
  ``patch_size`` here, on the device, row i with the key (seed, step, i); the
  result is laid out as ``batch_sharding`` (batch over 'data', depth over
  'spatial'). Without, the batch is used as it is. ``grad_accum`` > 1 averages the
  gradients of that many microbatches. A step whose loss or gradient is not finite
  leaves params and optimiser state unchanged and is reported in ``nonfinite_step``,
  so no NaN ever reaches a checkpoint. With ``sampler`` (resident data), ``batch`` is
  the resident training set and the step first draws its ``global_batch`` crops from
  it, row i with the key (seed, step, i) of `resident.sample_keys`.
  """
  if sampler is not None:
    batch = sampler(batch, resident.sample_keys(seed, state.step, global_batch))
  if augmentation is not None:
    keys = augment.sample_keys(seed, state.step, batch["label"].shape[0])
    batch = augment.augment_batch(augmentation, batch, keys, tuple(patch_size))
  if batch_sharding is not None and (augmentation is not None or sampler is not None):
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
  loss_fn = _loss_fn(model, regions, aux_loss_weight)
  (loss, parts), grads = _gradients(loss_fn, state.params, batch, grad_accum)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  step_metrics = TrainMetrics.single_from_model_output(
    loss=loss,
    grad_norm=grad_norm,
    nonfinite_step=jnp.where(finite, NO_NONFINITE_STEP, state.step + 1).astype(jnp.int32),
    **parts,
  )
  return _update_if_finite(state, tx, grads, finite), step_metrics


def input_sharding(config: ml_collections.ConfigDict, mesh) -> jax.sharding.Sharding:
  """Host crops are split over 'data' only when the step augments them (then re-laid out)."""
  if Task.from_config(config).augmentation.identity:
    return sharding.data_sharding(mesh)
  return sharding.batch_only_sharding(mesh)


def make_step_fn(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx,
  regions,
  mesh=None,
  augmented=True,
  resident_layout: str | None = None,
) -> Callable:
  """`train_step` with the model, optimiser, loss and augmentation settings of ``config``.

  The one place the step is assembled. ``augmented=False`` leaves augmentation out
  (the step then takes patches, not crops); ``resident_layout`` ('replicated' or
  'sharded') makes it take the resident training set (`resident.ResidentStream.arrays`)
  and draw its crops itself.
  """
  task = Task.from_config(config)
  spec = task.augmentation if augmented else augment.PRESETS["none"]
  sampler = None
  if resident_layout is not None:
    crop = task.crop_shape if augmented else task.patch_size
    if mesh is not None:
      draw = functools.partial(resident.sample_crops_on_mesh, mesh=mesh, layout=resident_layout)
    elif resident_layout == "replicated":
      draw = resident.sample_crops
    else:
      raise ValueError(f"resident_layout={resident_layout!r} needs a mesh (and 'sharded' one)")
    sampler = functools.partial(
      draw,
      patch=task.patch_size,
      crop=crop,
      fg_fraction=float(config.data.fg_fraction),
    )
  return functools.partial(
    train_step,
    model=model,
    tx=tx,
    regions=tuple(regions),
    aux_loss_weight=task.aux_loss_weight,
    grad_accum=config.train.grad_accum,
    augmentation=None if spec.identity else spec,
    patch_size=task.patch_size,
    seed=config.seed,
    batch_sharding=None if mesh is None else sharding.data_sharding(mesh),
    sampler=sampler,
    global_batch=int(config.train.batch_size),
  )


def compile_train_step(config, model, tx, regions, mesh, resident_layout=None) -> Callable:
  """The jitted step on ``mesh``: replicated state (donated), batch over data (x spatial);
  with ``resident_layout``, the resident set (replicated, or split over data) in its place."""
  state_sharding = sharding.replicated(mesh)
  batch_in = {
    None: input_sharding(config, mesh),
    "replicated": sharding.replicated(mesh),
    "sharded": sharding.batch_only_sharding(mesh),
  }[resident_layout]
  return jax.jit(
    make_step_fn(config, model, tx, regions, mesh, resident_layout=resident_layout),
    in_shardings=(state_sharding, batch_in),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def init_state(model: nn.Module, tx, patch_size, rng: jax.Array) -> TrainState:
  dummy = jnp.zeros((1, *patch_size, 1), jnp.float32)
  params = model.init(rng, dummy, dummy)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def input_shapes(config: ml_collections.ConfigDict, augmented=True) -> dict:
  """The global host batch the step takes (crops, with augmentation's margin), as shapes."""
  task = Task.from_config(config)
  b = config.train.batch_size
  crop = task.crop_shape if augmented else task.patch_size
  return {
    "pre": jax.ShapeDtypeStruct((b, *crop, 1), jnp.float32),
    "post": jax.ShapeDtypeStruct((b, *crop, 1), jnp.float32),
    "label": jax.ShapeDtypeStruct((b, *crop), jnp.uint8),
  }


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one training step on the global batch, from XLA's cost analysis (no data).

  The model's cost alone (augmentation left out), so models compare on the same footing.
  """
  task = Task.from_config(config)
  tx = make_optimizer(config.train)
  init = functools.partial(init_state, task.model, tx, task.patch_size)
  state = jax.eval_shape(init, jax.random.key(0))
  batch = input_shapes(config, augmented=False)
  step = make_step_fn(config, task.model, tx, task.region_values, augmented=False)
  compiled = jax.jit(step).lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per device
  return float(cost["flops"])
