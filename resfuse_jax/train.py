"""Training and evaluation loop: ``train_and_evaluate(config, workdir)``.

Made of named stages: ``prepare_data`` (cache, splits, cases), ``make_input``
(the Grain patch stream), ``build_or_restore_state``, ``train_loop`` (updates,
logging, validation, checkpoints, preemption) and ``write_results``
(final evaluation, ``W/results.json`` and ``W/metrics.csv``). The step itself
is the pure ``train_step``.
"""

import contextlib
import dataclasses
import functools
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from jax.experimental import multihost_utils

from resfuse_jax import (
  augment,
  backend,
  checkpointing,
  data,
  files,
  losses,
  models,
  sharding,
  writers,
)
from resfuse_jax.data import pipeline
from resfuse_jax.errors import CheckpointError, ConfigError, DataError, Preempted
from resfuse_jax.evaluation import evaluation, metrics, postprocess_selection
from resfuse_jax.inference import postprocess, predictor


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
) -> tuple[TrainState, TrainMetrics]:
  """One optimisation step on a global batch {'pre','post': [B,*crop,1], 'label': [B,*crop]}.

  With ``augmentation``, the host crops are first augmented and cut to
  ``patch_size`` here, on the device, row i with the key (seed, step, i); the
  result is laid out as ``batch_sharding`` (batch over 'data', depth over
  'spatial'). Without, the batch is used as it is. ``grad_accum`` > 1 averages the gradients of that many microbatches (a scan, so
  activations of one microbatch are alive at a time). A step whose loss or
  gradient is not finite leaves params and optimiser state unchanged and is
  reported in ``nonfinite_step``, so no NaN ever reaches a checkpoint.
  """

  def loss_fn(params, micro):
    targets = losses.labels_to_regions(micro["label"], regions)
    logits, sown = model.apply(
      {"params": params}, micro["pre"], micro["post"], mutable=["aux_logits"]
    )
    aux = jax.tree.leaves(sown.get("aux_logits", {}))
    return losses.total_loss(logits, aux, targets, aux_loss_weight)

  if augmentation is not None:
    keys = augment.sample_keys(seed, state.step, batch["label"].shape[0])
    batch = augment.augment_batch(augmentation, batch, keys, tuple(patch_size))
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    (loss, parts), grads = grad_fn(state.params, batch)
  else:

    def accumulate(total, micro):
      return jax.tree.map(jnp.add, total, grad_fn(state.params, micro)), None

    first = jax.tree.map(lambda x: x[0], _microbatches(batch, grad_accum))
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, first))
    total, _ = jax.lax.scan(accumulate, zeros, _microbatches(batch, grad_accum))
    (loss, parts), grads = jax.tree.map(lambda x: x / grad_accum, total)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep_if_bad = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = state.replace(
    step=state.step + 1,
    params=keep_if_bad(params, state.params),
    opt_state=keep_if_bad(opt_state, state.opt_state),
  )
  step_metrics = TrainMetrics.single_from_model_output(
    loss=loss,
    grad_norm=grad_norm,
    nonfinite_step=jnp.where(finite, NO_NONFINITE_STEP, state.step + 1).astype(jnp.int32),
    **parts,
  )
  return new_state, step_metrics


def augmentation(config: ml_collections.ConfigDict) -> augment.Spec:
  return augment.spec_from_config(config.data.augment)


def crop_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The host crop the step takes: the patch plus the margin augmentation needs."""
  return augmentation(config).crop_shape(tuple(config.data.patch_size))


def input_sharding(config: ml_collections.ConfigDict, mesh) -> jax.sharding.Sharding:
  """Host crops are split over 'data' only when the step augments them (then re-laid out)."""
  if augmentation(config).identity:
    return sharding.data_sharding(mesh)
  return sharding.batch_only_sharding(mesh)


def make_step_fn(
  config: ml_collections.ConfigDict, model: nn.Module, tx, regions, mesh=None, augmented=True
) -> Callable:
  """`train_step` with the model, optimiser, loss and augmentation settings of ``config``.

  ``augmented=False`` leaves augmentation out (the step then takes patches, not crops).
  """
  spec = augmentation(config) if augmented else augment.PRESETS["none"]
  return functools.partial(
    train_step,
    model=model,
    tx=tx,
    regions=regions,
    aux_loss_weight=config.train.aux_loss_weight,
    grad_accum=config.train.get("grad_accum", 1),
    augmentation=None if spec.identity else spec,
    patch_size=tuple(config.data.patch_size),
    seed=config.seed,
    batch_sharding=None if mesh is None else sharding.data_sharding(mesh),
  )


def compile_train_step(config, model, tx, regions, mesh) -> Callable:
  """The jitted step on ``mesh``: replicated state (donated), batch over data (x spatial)."""
  state_sharding = sharding.replicated(mesh)
  return jax.jit(
    make_step_fn(config, model, tx, regions, mesh),
    in_shardings=(state_sharding, input_sharding(config, mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def init_state(model: nn.Module, tx, patch_size, rng: jax.Array) -> TrainState:
  dummy = jnp.zeros((1, *patch_size, 1), jnp.float32)
  params = model.init(rng, dummy, dummy)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def input_shapes(config: ml_collections.ConfigDict, augmented=True) -> dict:
  """The global host batch the step takes (crops, with augmentation's margin), as shapes."""
  b = config.train.batch_size
  crop = crop_shape(config) if augmented else tuple(config.data.patch_size)
  return {
    "pre": jax.ShapeDtypeStruct((b, *crop, 1), jnp.float32),
    "post": jax.ShapeDtypeStruct((b, *crop, 1), jnp.float32),
    "label": jax.ShapeDtypeStruct((b, *crop), jnp.uint8),
  }


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one training step on the global batch, from XLA's cost analysis (no data).

  The model's cost alone (augmentation left out), so models compare on the same footing.
  """
  regions = tuple(data.get_dataset(config.data.name).regions.values())
  model = predictor.build_model(config)
  tx = make_optimizer(config.train)
  patch = tuple(config.data.patch_size)
  state = jax.eval_shape(functools.partial(init_state, model, tx, patch), jax.random.key(0))
  batch = input_shapes(config, augmented=False)
  step = make_step_fn(config, model, tx, regions, augmented=False)
  compiled = jax.jit(step).lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per device
  return float(cost["flops"])


class Progress:
  """Steps/s and ETA at logging points (clu's periodic_actions would import TensorFlow)."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.perf_counter()

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    return {"steps_per_sec": rate, "eta_sec": eta}


class StopRequest:
  """SIGTERM/SIGINT -> save at the next step boundary and stop.

  One process: Python signal handlers set a flag. Several processes: JAX's
  preemption sync point (installed by ``jax.distributed.initialize``, on
  SIGTERM) makes every process stop at the same step; Python handlers are not
  installed there, so they cannot shadow JAX's.
  """

  def __init__(self):
    self.reason: str | None = None
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    self.reason = signal.Signals(signum).name

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
      self.reason = "the preemption notice (SIGTERM)"
    return self.reason is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _raise_if_nonfinite(first_bad_step: int, manager, state: TrainState) -> None:
  """Stops on a non-finite step, naming the newest checkpoint that verifies on disk."""
  if first_bad_step != NO_NONFINITE_STEP:
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    good = checkpointing.newest_verified_step(manager, abstract)
    kept = "no checkpoint verifies" if good is None else f"step {good} verifies"
    raise FloatingPointError(
      f"non-finite training loss or gradient at step {first_bad_step} (that update was not "
      f"applied); stopping. The last good checkpoint is kept: {kept}, in {manager.directory}"
    )


def _format_eta(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  return f"{m}m{s:02d}s"


def load_or_make_splits(workdir: Path, case_ids: list[str], cfg) -> dict:
  """Reuses ``splits.json`` of a resumed run, so a fold never changes under a checkpoint."""
  path = workdir / "splits.json"
  if path.exists():
    splits = json.loads(path.read_text())
    missing = sorted(set(splits["train"] + splits["val"]) - set(case_ids))
    if missing:
      raise DataError(f"{path} names cases no longer found under data.root: {missing[:5]}")
    return splits
  return data.make_splits(case_ids, cfg.fold, cfg.num_folds, cfg.split_seed)


def parameter_checksum(params: Any) -> float:
  """Sum of this process's copy of the (replicated) parameters, in float64."""
  return float(
    sum(np.sum(np.asarray(x.addressable_data(0), np.float64)) for x in jax.tree.leaves(params))
  )


@dataclasses.dataclass
class RunData:
  """The cases of one run: its dataset, training and validation cases (memory-mapped)."""

  dataset: data.Dataset
  cache_dir: Path
  train_cases: list[data.Case]
  val_cases: list[data.Case]


def prepare_data(config: ml_collections.ConfigDict, workdir: Path) -> RunData:
  """Preprocessed cache (process 0 builds, the others then reuse it), splits, cases.

  Writes ``W/splits.json`` and, for skipped cases, ``W/bad_cases.json``.
  """
  is_main = jax.process_index() == 0
  dataset = data.get_dataset(config.data.name)
  files_ = data.find_cases(config.data)
  if is_main:
    cache_dir, good_ids, bad = data.prepare(config.data, files_)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("preprocessed cache")
  if not is_main:
    cache_dir, good_ids, bad = data.prepare(config.data, files_, progress=False)
  splits = load_or_make_splits(workdir, good_ids, config.data)
  if is_main:
    files.write_json(workdir / "splits.json", splits)
    if bad:
      files.write_json(workdir / "bad_cases.json", bad)
  val_ids = splits["val"][: config.eval.max_cases] if config.eval.max_cases else splits["val"]
  run = RunData(
    dataset,
    cache_dir,
    data.load_cases(cache_dir, splits["train"]),
    data.load_cases(cache_dir, val_ids),
  )
  logging.info(
    "%d training cases, %d validation cases (cache %s)",
    len(run.train_cases),
    len(run.val_cases),
    cache_dir,
  )
  return run


def make_input(config: ml_collections.ConfigDict, run: RunData, mesh) -> Any:
  """This process's iterator over its share of the global batch stream."""
  local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
  return iter(
    pipeline.train_dataset(
      run.train_cases,
      patch_size=config.data.patch_size,
      batch_size=local_batch,
      regions=run.dataset.regions,
      fg_fraction=config.data.fg_fraction,
      seed=config.seed,
      crop_shape=crop_shape(config),
      workers=config.data.workers,
      prefetch=config.data.get("prefetch", 16),
      read_threads=config.data.get("read_threads", 8),
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
    )
  )


def build_or_restore_state(
  config: ml_collections.ConfigDict, model: nn.Module, tx, mesh, manager, train_iter
) -> tuple[TrainState, int]:
  """A new state created already replicated on the mesh, or the latest checkpoint's.

  Restoring also moves ``train_iter`` to the saved position. Returns (state, step).
  """
  patch = tuple(config.data.patch_size)
  sharding.check_patch_size(patch, len(config.model.features), mesh)
  init = jax.jit(
    functools.partial(init_state, model, tx, patch), out_shardings=sharding.replicated(mesh)
  )
  state = init(jax.random.key(config.seed))
  if jax.process_index() == 0:
    logging.info(
      "%s (conv %s)\n%s",
      config.model.name,
      config.model.get("conv_impl", "auto"),
      parameter_overview.get_parameter_overview(state.params),
    )
  if manager.latest_step() is None:
    return state, 0
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  state, step = checkpointing.restore_verified(manager, abstract, train_iter)
  logging.info("Resumed from %s at step %d (verified)", manager.directory, step)
  return state, step


def validate(
  window_fn: Callable,
  params: Any,
  cases: list[data.Case],
  config,
  mesh,
  collector: postprocess_selection.Collector | None = None,
) -> metrics.RegionMetrics:
  """Validation through the one evaluation path, windows split over the mesh's 'data'.

  With ``collector`` (the final validation): BraTS lesion-wise metrics too, and every
  case's masks kept for choosing the post-processing.
  """
  n = mesh.shape[sharding.DATA]
  batch = -(-backend.resolve("eval_batch_size", config.eval.batch_size) // n) * n
  tiles_sharding = sharding.data_sharding(mesh)

  def predict(tiles: np.ndarray) -> np.ndarray:
    return np.asarray(window_fn(params, sharding.put_global(tiles, tiles_sharding)))

  lesion_wise = collector is not None and data.get_dataset(config.data.name).brats_like
  return evaluation.evaluate_cases(
    predict, cases, config, batch_size=batch, lesion_wise=lesion_wise, on_case=collector
  )


@dataclasses.dataclass
class Loop:
  """What the loop runs with: compiled functions, the data stream and the outputs."""

  step_fn: Callable
  window_fn: Callable
  train_iter: Any
  manager: Any
  writer: Any
  mesh: Any
  final_masks: list | None = None  # the final validation's cropped masks


def _log_train(step: int, total: int, computed: dict, progress: Progress, writer) -> None:
  scalars = {f"train/{k}": float(v) for k, v in computed.items()}
  speed = progress.report(step)
  writer.write_scalars(step, {**scalars, "train/steps_per_sec": speed["steps_per_sec"]})
  logging.info(
    "step %d/%d | loss %.4f | %.2f steps/s | ETA %s",
    step,
    total,
    scalars["train/loss"],
    speed["steps_per_sec"],
    _format_eta(speed["eta_sec"]),
  )


def _validate_and_log(config, loop: Loop, state, run: RunData, step: int):
  t0 = time.perf_counter()
  final = step == config.train.steps
  collector = postprocess_selection.Collector(config.eval, run.dataset.regions) if final else None
  val = validate(loop.window_fn, state.params, run.val_cases, config, loop.mesh, collector)
  loop.final_masks = collector.cases if final else None
  summary = val.summary()
  loop.writer.write_scalars(
    step, {f"val/{m}_{r}": v for m, d in summary.items() for r, v in d.items()}
  )
  logging.info(
    "step %d validation (%d cases, %.1fs): Dice %s",
    step,
    len(run.val_cases),
    time.perf_counter() - t0,
    ", ".join(f"{r} {v:.4f}" for r, v in summary["dice"].items()),
  )
  return val


def train_loop(config, loop: Loop, state: TrainState, start_step: int, run: RunData):
  """Steps ``start_step + 1 .. train.steps``; returns (state, last validation or None).

  Host syncs only at logging, evaluation and checkpoint points. SIGTERM/SIGINT
  save at the next step boundary and raise ``Preempted``.
  """
  total = config.train.steps
  batch_sharding = input_sharding(config, loop.mesh)
  progress = Progress(total, start_step)
  pending: TrainMetrics | None = None
  val = None
  stop = StopRequest()
  try:
    for step in range(start_step + 1, total + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.put_batch(next(loop.train_iter), batch_sharding)
        state, step_metrics = loop.step_fn(state, batch)
      pending = step_metrics if pending is None else pending.merge(step_metrics)
      is_log = step % config.train.log_every == 0 or step == total
      is_eval = step % config.eval.every_steps == 0 or step == total
      preempted = stop.requested(step)
      is_save = is_eval or preempted or step % config.checkpoint.every_steps == 0
      if is_log or is_save:  # the finiteness check rides on the logging sync
        computed = {k: np.asarray(v) for k, v in pending.compute().items()}
        _raise_if_nonfinite(int(computed.pop("nonfinite_step")), loop.manager, state)
      if is_log:
        pending = None
        _log_train(step, total, computed, progress, loop.writer)
      ckpt_metrics = None
      if is_eval and not preempted:
        val = _validate_and_log(config, loop, state, run, step)
        ckpt_metrics = {checkpointing.BEST_METRIC: val.summary()["dice"]["mean"]}
        progress.last_time = time.perf_counter()  # keep evaluation out of steps/s
      if is_save:
        checkpointing.save(loop.manager, step, state, loop.train_iter, ckpt_metrics)
        loop.writer.flush()  # a killed run keeps its curves up to its last checkpoint
      if preempted:
        loop.manager.wait_until_finished()
        raise Preempted(
          f"stopped by {stop.reason} at step {step}/{total}; checkpoint saved in "
          f"{loop.manager.directory}: rerun the same command to resume"
        )
  finally:
    stop.restore()
    loop.manager.wait_until_finished()  # a good save in flight completes before any exit
  return state, val


def write_results(config, workdir: Path, loop: Loop, state, run: RunData, val) -> dict:
  """``W/results.json`` and ``W/metrics.csv`` (per case, for paired comparisons).

  ``val`` is the final step's validation; a resumed finished run evaluates again.
  """
  logging.info(  # equal on every process of a multi-host run: the replicas agree
    "process %d/%d: final parameter checksum %.12e",
    jax.process_index(),
    jax.process_count(),
    parameter_checksum(state.params),
  )
  if val is None or loop.final_masks is None:
    collector = postprocess_selection.Collector(config.eval, run.dataset.regions)
    val = validate(loop.window_fn, state.params, run.val_cases, config, loop.mesh, collector)
    loop.final_masks = collector.cases
  step = int(jax.device_get(state.step))
  results = evaluation.results_record(config, step, models.count_params(state.params), val)
  norms = models.fusion_weight_norms(state.params)
  if norms:  # ResFuse's learned W_l, per encoder level
    results["fusion_weight_norms"] = norms
  if jax.process_index() == 0:
    after, rules = choose_postprocessing(workdir, loop.final_masks, run.dataset)
    results["postprocessed"] = after.summary() | {"rules": rules}
    val.write_csv(workdir / "metrics.csv")
    after.write_csv(workdir / "metrics_postprocessed.csv")
    files.write_json(workdir / "results.json", results)
    print(
      f"Validation Dice over {results['cases']} cases ({config.model.name}, step {step}): "
      + ", ".join(f"{r} {v:.4f}" for r, v in results["dice"].items())
    )
    if "lesion_dice" in results:
      print(
        "Lesion-wise Dice before / after post-processing: "
        + ", ".join(
          f"{r} {results['lesion_dice'][r]:.4f} / {results['postprocessed']['lesion_dice'][r]:.4f}"
          for r in run.dataset.region_names
        )
      )
  return results


def choose_postprocessing(
  workdir: Path, cases: list, dataset: data.Dataset
) -> tuple[metrics.RegionMetrics, dict[str, str]]:
  """Writes ``W/postprocessing.json`` and ``W/validation_masks.npz``.

  Returns the validation metrics after the chosen rules, and the rules in words.
  """
  names, brats_like = dataset.region_names, dataset.brats_like
  postprocess_selection.save_masks(workdir / postprocess_selection.MASKS_FILE, cases)
  record = postprocess_selection.determine(cases, names, brats_like)
  files.write_json(workdir / postprocess.FILE, record)
  rules = postprocess.rules_from_record(record, names, str(workdir))
  after = postprocess_selection.evaluate_rules(cases, rules, names, lesion_wise=brats_like)
  logging.info("post-processing chosen on %d validation cases: %s", len(cases), record["describe"])
  return after, record["describe"]


# Settings that change neither the parameters nor the data: a resumed run may differ in them.
RUNTIME_ONLY = {
  "model": {"conv_impl", "downsample", "upsample", "conv_layout"},
  "data": {
    "workers", "prefetch", "read_threads", "preprocess_workers", "cache_dir", "on_bad_case",
    "max_voxels", "max_bytes", "spacing_range",
  },
}  # fmt: skip
# Settings added after runs were written: a saved config without one ran at this value.
ADDED_LATER = {"data": {knob: 0.0 for knob in data.PHANTOM_KNOBS}}


def resume_conflicts(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """``section.key: saved -> new`` for every model/data setting a resume may not change."""
  new = json.loads(json.dumps(config.to_dict()))
  out = []
  for section, runtime in RUNTIME_ONLY.items():
    old_s, new_s = saved.get(section, {}), new.get(section, {})
    added = ADDED_LATER.get(section, {})
    for key in sorted((set(old_s) | set(new_s)) - runtime):
      before = old_s.get(key, added.get(key, "(unset)"))
      if before != new_s.get(key, "(unset)"):
        out.append(f"{section}.{key}: {before!r} -> {new_s.get(key, '(unset)')!r}")
  return out


def claim_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Refuses a rerun whose model or data differ from ``W/config.json``, then writes it.

  Checked before anything is written, so a refused run leaves the workdir as it was.
  """
  path = workdir / "config.json"
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(
        f"{path} cannot be read ({e}); it describes this workdir's run"
      ) from None
    conflicts = resume_conflicts(saved, config)
    if conflicts:
      raise CheckpointError(
        f"{workdir} holds a run of another model or data; resuming it with this config would "
        f"mix the two. Differences from {path}: {'; '.join(conflicts[:6])}"
        + (f" (and {len(conflicts) - 6} more)" if len(conflicts) > 6 else "")
        + ". Use a new --workdir, or the workdir's own settings"
      )
  files.write_json(path, config.to_dict())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config.model`` on ``config.data``, resuming from ``workdir``; returns results.

  Process 0 holds ``W/.lock`` for the whole run: a second run on the same workdir
  fails at once, naming the holder.
  """
  workdir = files.make_dirs(workdir)
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      stack.enter_context(files.exclusive_lock(workdir, "training run"))
      claim_workdir(config, workdir)
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  run = prepare_data(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  train_iter = make_input(config, run, mesh)
  model, tx = predictor.build_model(config), make_optimizer(config.train)
  manager = checkpointing.make_manager(workdir / "checkpoints", config.checkpoint.keep)
  writer = writers.create(workdir, just_logging=jax.process_index() != 0)
  try:
    state, start_step = build_or_restore_state(config, model, tx, mesh, manager, train_iter)
    if start_step == 0:
      writer.write_hparams(dict(config.to_dict()))
      writer.flush()
    regions = tuple(run.dataset.regions.values())
    loop = Loop(
      step_fn=compile_train_step(config, model, tx, regions, mesh),
      window_fn=predictor.make_sharded_window_fn(model, mesh),
      train_iter=train_iter,
      manager=manager,
      writer=writer,
      mesh=mesh,
    )
    state, val = train_loop(config, loop, state, start_step, run)
    writer.flush()
    return write_results(config, workdir, loop, state, run, val)
  finally:
    writer.close()
    manager.close()
