"""Training and evaluation loop: ``train_and_evaluate(config, workdir)``."""

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

from resfuse_jax import checkpointing, data, inference, losses, metrics, models, sharding, writers
from resfuse_jax.data import pipeline


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
    raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")
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
) -> tuple[TrainState, TrainMetrics]:
  """One optimisation step on a global batch {'pre','post': [B,D,H,W,1], 'label': [B,D,H,W]}.

  ``grad_accum`` > 1 averages the gradients of that many microbatches (a scan, so
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


def make_step_fn(config: ml_collections.ConfigDict, model: nn.Module, tx, regions) -> Callable:
  """`train_step` with the model, optimiser and loss settings of ``config`` bound."""
  return functools.partial(
    train_step,
    model=model,
    tx=tx,
    regions=regions,
    aux_loss_weight=config.train.aux_loss_weight,
    grad_accum=config.train.get("grad_accum", 1),
  )


def compile_train_step(config, model, tx, regions, mesh) -> Callable:
  """The jitted step on ``mesh``: replicated state (donated), batch over data x spatial."""
  state_sharding = sharding.replicated(mesh)
  return jax.jit(
    make_step_fn(config, model, tx, regions),
    in_shardings=(state_sharding, sharding.data_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """``train.compute_dtype``: activations and matmuls; parameters stay float32."""
  name = config.train.get("compute_dtype", "float32")
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"train.compute_dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def build_model(config: ml_collections.ConfigDict, num_outputs: int) -> nn.Module:
  return models.build(config.model, num_outputs, compute_dtype(config))


def init_state(model: nn.Module, tx, patch_size, rng: jax.Array) -> TrainState:
  dummy = jnp.zeros((1, *patch_size, 1), jnp.float32)
  params = model.init(rng, dummy, dummy)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one training step on the global batch, from XLA's cost analysis (no data)."""
  regions = tuple(data.dataset_info(config.data.name).regions.values())
  model = build_model(config, len(regions))
  tx = make_optimizer(config.train)
  patch = tuple(config.data.patch_size)
  state = jax.eval_shape(functools.partial(init_state, model, tx, patch), jax.random.key(0))
  b = config.train.batch_size
  batch = {
    "pre": jax.ShapeDtypeStruct((b, *patch, 1), jnp.float32),
    "post": jax.ShapeDtypeStruct((b, *patch, 1), jnp.float32),
    "label": jax.ShapeDtypeStruct((b, *patch), jnp.int32),
  }
  compiled = jax.jit(make_step_fn(config, model, tx, regions)).lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per device
  return float(cost["flops"])


def make_predict_fn(model: nn.Module, mesh) -> Callable:
  """jit'ed (params, tiles [N, d, h, w, 2]) -> sigmoid probabilities, tiles split over 'data'."""

  def predict(params, tiles):
    logits = model.apply({"params": params}, tiles[..., 0:1], tiles[..., 1:2])
    return jax.nn.sigmoid(logits)

  return jax.jit(
    predict,
    in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def evaluate(
  predict_fn: Callable,
  params: Any,
  cases: list[data.Case],
  info: data.DatasetInfo,
  config: ml_collections.ConfigDict,
  mesh,
) -> metrics.RegionMetrics:
  """Sliding-window prediction of whole validation volumes; per-case region metrics."""
  batch = -(-config.eval.batch_size // mesh.shape[sharding.DATA]) * mesh.shape[sharding.DATA]
  in_sharding = sharding.data_sharding(mesh)

  def predict_tiles(tiles: np.ndarray) -> np.ndarray:
    return np.asarray(predict_fn(params, sharding.put_global(tiles, in_sharding)))

  acc = metrics.RegionMetrics(info.region_names)
  regions = tuple(info.regions.values())
  for case in cases:
    volume = np.stack([case.pre, case.post], axis=-1)
    probs = inference.sliding_window(
      predict_tiles,
      volume,
      config.data.patch_size,
      len(regions),
      overlap=config.eval.overlap,
      batch_size=batch,
    )
    ref = np.stack([np.isin(case.label, v) for v in regions], axis=-1)
    acc.add(case.case_id, probs > 0.5, ref, case.spacing)
  return acc


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


class Preempted(Exception):
  """Training stopped at a step boundary on request; the workdir resumes from there."""


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


def _raise_if_nonfinite(first_bad_step: int, manager) -> None:
  if first_bad_step != NO_NONFINITE_STEP:
    raise FloatingPointError(
      f"non-finite training loss or gradient at step {first_bad_step} (that update was not "
      f"applied); stopping. The last good checkpoint is kept: step {manager.latest_step()} in "
      f"{manager.directory}"
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
      raise data.DataError(f"{path} names cases no longer found under data.root: {missing[:5]}")
    return splits
  return data.make_splits(case_ids, cfg.fold, cfg.num_folds, cfg.split_seed)


def _write_json(path: Path, obj: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.replace(path)


def parameter_checksum(params: Any) -> float:
  """Sum of this process's copy of the (replicated) parameters, in float64."""
  return float(
    sum(np.sum(np.asarray(x.addressable_data(0), np.float64)) for x in jax.tree.leaves(params))
  )


def count_params(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config.model`` on ``config.data``, resuming from ``workdir``; returns results."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  info = data.dataset_info(config.data.name)
  regions = tuple(info.regions.values())

  # ----- Data: preprocessed cache (process 0 builds, the others reuse or build locally) --
  files = data.find_cases(config.data)
  if is_main:
    cache_dir, good_ids, bad = data.prepare(config.data, files)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("preprocessed cache")
  if not is_main:
    cache_dir, good_ids, bad = data.prepare(config.data, files, progress=False)
  splits = load_or_make_splits(workdir, good_ids, config.data)
  if is_main:
    _write_json(workdir / "config.json", config.to_dict())
    _write_json(workdir / "splits.json", splits)
    if bad:
      _write_json(workdir / "bad_cases.json", bad)
  train_cases = data.load_cases(cache_dir, splits["train"])
  val_ids = splits["val"][: config.eval.max_cases] if config.eval.max_cases else splits["val"]
  val_cases = data.load_cases(cache_dir, val_ids)
  logging.info(
    "%d training cases, %d validation cases (cache %s)", len(train_cases), len(val_cases), cache_dir
  )

  # ----- Mesh and input --------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
  train_iter = iter(
    pipeline.train_dataset(
      train_cases,
      patch_size=config.data.patch_size,
      batch_size=local_batch,
      regions=info.regions,
      fg_fraction=config.data.fg_fraction,
      seed=config.seed,
      augment=pipeline.Augment.from_config(config.data.augment),
      workers=config.data.workers,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
    )
  )

  # ----- Model and state, created already placed on the mesh --------------------
  model = build_model(config, len(regions))
  tx = make_optimizer(config.train)
  patch = tuple(config.data.patch_size)
  sharding.check_patch_size(patch, len(config.model.features), mesh)
  state_sharding = sharding.replicated(mesh)
  state = jax.jit(functools.partial(init_state, model, tx, patch), out_shardings=state_sharding)(
    jax.random.key(config.seed)
  )
  num_params = count_params(state.params)
  if is_main:
    logging.info(
      "%s\n%s", config.model.name, parameter_overview.get_parameter_overview(state.params)
    )

  # ----- Checkpoints: resume if the workdir has one -----------------------------
  manager = checkpointing.make_manager(workdir / "checkpoints", config.checkpoint.keep)
  start_step = 0
  if manager.latest_step() is not None:
    start_step = manager.latest_step()
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    state = checkpointing.restore(manager, start_step, abstract, train_iter)
    logging.info("Resumed from %s at step %d", manager.directory, start_step)

  # ----- Update ----------------------------------------------------------------
  batch_sharding = sharding.data_sharding(mesh)
  step_fn = compile_train_step(config, model, tx, regions, mesh)
  predict_fn = make_predict_fn(model, mesh)
  writer = writers.create(workdir, just_logging=not is_main)
  if start_step == 0:
    writer.write_hparams(dict(config.to_dict()))
  total = config.train.steps
  progress = Progress(total, start_step)
  pending: TrainMetrics | None = None
  val_summary = val_metrics = None

  stop = StopRequest()
  try:
    for step in range(start_step + 1, total + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.put_batch(next(train_iter), batch_sharding)
        state, step_metrics = step_fn(state, batch)
      pending = step_metrics if pending is None else pending.merge(step_metrics)
      is_log = step % config.train.log_every == 0 or step == total
      is_eval = step % config.eval.every_steps == 0 or step == total
      preempted = stop.requested(step)
      is_save = is_eval or preempted or step % config.checkpoint.every_steps == 0

      # ----- Logging and the finiteness check (the only host syncs in the loop) ------
      if is_log or is_save:
        computed = {k: np.asarray(v) for k, v in pending.compute().items()}
        _raise_if_nonfinite(int(computed.pop("nonfinite_step")), manager)
      if is_log:
        pending = None
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

      # ----- Evaluation and checkpoints --------------------------------------
      ckpt_metrics = None
      if is_eval and not preempted:
        t0 = time.perf_counter()
        val_metrics = evaluate(predict_fn, state.params, val_cases, info, config, mesh)
        val_summary = val_metrics.summary()
        ckpt_metrics = {checkpointing.BEST_METRIC: val_summary["dice"]["mean"]}
        writer.write_scalars(
          step, {f"val/{m}_{r}": v for m, d in val_summary.items() for r, v in d.items()}
        )
        logging.info(
          "step %d validation (%d cases, %.1fs): Dice %s",
          step,
          len(val_cases),
          time.perf_counter() - t0,
          ", ".join(f"{r} {v:.4f}" for r, v in val_summary["dice"].items()),
        )
        progress.last_time = time.perf_counter()  # keep evaluation out of steps/s
      if is_save:
        checkpointing.save(manager, step, state, train_iter, ckpt_metrics)
      if preempted:
        manager.wait_until_finished()
        raise Preempted(
          f"stopped by {stop.reason} at step {step}/{total}; checkpoint saved in "
          f"{manager.directory}: rerun the same command to resume"
        )
  finally:
    stop.restore()
    manager.wait_until_finished()  # a good save in flight completes before any exit
  writer.flush()
  logging.info(  # equal on every process of a multi-host run: the replicas agree
    "process %d/%d: final parameter checksum %.12e",
    jax.process_index(),
    jax.process_count(),
    parameter_checksum(state.params),
  )

  # ----- Results ---------------------------------------------------------------
  if val_summary is None:  # resumed a finished run: evaluate the final state again
    val_metrics = evaluate(predict_fn, state.params, val_cases, info, config, mesh)
    val_summary = val_metrics.summary()
  results = {
    "model": config.model.name,
    "variant": config.model.get("variant", config.model.name),
    "dataset": config.data.name,
    "steps": int(jax.device_get(state.step)),
    "params": num_params,
    **val_summary,
    "cases": len(val_cases),
  }
  if is_main:
    val_metrics.write_csv(workdir / "metrics.csv")  # per case, for paired comparisons
    _write_json(workdir / "results.json", results)
    print(
      f"Validation Dice over {len(val_cases)} cases ({config.model.name}, step "
      f"{results['steps']}): " + ", ".join(f"{r} {v:.4f}" for r, v in results["dice"].items())
    )
  writer.close()
  manager.close()
  return results
