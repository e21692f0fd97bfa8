"""Orbax checkpoints of the train state and the Grain iterator; export folders' params.

Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves no step that ``latest_step`` would restore.
A training checkpoint step holds ``state`` (the TrainState: step, params,
opt_state), ``data`` (the Grain iterator position) and ``digests`` (a SHA-256,
dtype, shape and finiteness per array, computed from the state being saved);
an export folder holds ``params`` only, its digests in ``export.json``. Names
say what they restore.

Orbax's atomic rename guards against a kill mid-save, not against a bit flip,
a truncated file or a step written by something else; every restore here
checks the digests, so such a step is reported by step and reason and never
used: training resumes from the newest step that verifies (moving the bad ones
to ``W/corrupt_checkpoints/``), and ``predict``/``export`` refuse it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from resfuse_jax import files
from resfuse_jax.errors import CheckpointError, OutputError

BEST_METRIC = "val_dice_mean"
EXPORT_FORMAT = "resfuse_jax-export-1"
ENSEMBLE_FORMAT = "resfuse_jax-ensemble-1"  # an export of a cross-validation's folds
EXPORT_SERVING_FILE = "serving/window.jax_export"
DIGESTS_ITEM = "digests"
DIGESTS_FILE = f"{DIGESTS_ITEM}/metadata"  # where Orbax's JsonSave puts the item
QUARANTINE = "corrupt_checkpoints"


# ----- Digests: what a restored array must match ---------------------------------------


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _host_copy(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if not leaf.is_fully_replicated:
      raise NotImplementedError("digests of arrays sharded across processes")
    leaf = leaf.addressable_data(0)
  return np.asarray(leaf)


def array_digests(tree: Any, prefix: str) -> dict[str, dict]:
  """``{'<prefix>/<path>': {sha256, dtype, shape, finite}}`` of every array in ``tree``."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(_host_copy(leaf))
    finite = bool(np.isfinite(a).all())
    out["/".join([prefix, *map(_key_name, path)])] = {
      "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
      "dtype": str(a.dtype),
      "shape": list(a.shape),
      "finite": finite,
    }
  return out


STATE_FIELDS = ("step", "params", "opt_state")


def _field(state: Any, name: str) -> Any:
  return state[name] if isinstance(state, dict) else getattr(state, name)


def _restored_digests(state: Any) -> dict[str, dict]:
  out = {}
  for name in STATE_FIELDS:
    out.update(array_digests(_field(state, name), name))
  return out


def state_digests(state: Any) -> dict:
  """The record saved beside a TrainState: one digest per step/params/opt_state array."""
  arrays = _restored_digests(state)
  return {"version": 1, "arrays": arrays, "finite": all(d["finite"] for d in arrays.values())}


def digest_problem(recorded: dict, restored: dict) -> str | None:
  """Why ``restored`` digests (a subset, by key) do not match ``recorded``; None if they do."""
  if not recorded:
    return "no checksum record"
  missing = sorted(set(restored) - set(recorded))
  if missing:
    return f"arrays {missing[:3]} have no recorded checksum (another model?)"
  bad = [k for k, d in restored.items() if d != recorded[k]]
  if bad:
    return (
      f"{len(bad)} array(s) differ from the checksums recorded at save, first {bad[0]} "
      "(the files were damaged or changed after the save)"
    )
  nonfinite = [k for k, d in restored.items() if not d["finite"]]
  if nonfinite:
    return f"arrays {nonfinite[:3]} hold NaN or Inf"
  return None


def read_digests(step_dir: Path) -> dict:
  path = step_dir / DIGESTS_FILE
  if not path.is_file():
    raise CheckpointError(
      f"{step_dir} has no checksum record ({DIGESTS_FILE}): written by an older version "
      "or by something else, so it cannot be verified"
    )
  try:
    record = json.loads(path.read_text())
    return dict(record["arrays"])
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path}: the checksum record is damaged ({e})") from None


def _reason(e: BaseException) -> str:
  """A short cause: the innermost exception's first line, without TensorStore's spec dump."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()
  line = re.split(
    r"\s*(See full TensorStore details|\[source locations=)", text[0] if text else ""
  )[0]
  return f"{type(e).__name__}: {line[:200]}{'...' if len(line) > 200 else ''}"


def _other_steps(step: int, steps: list[int]) -> str:
  """Where to go instead of a damaged step: ``--step=N`` of the newest other one."""
  others = sorted((s for s in steps if s != step), reverse=True)
  if not others:
    return "it is the only checkpoint: retrain, or restore the folder from a backup"
  return f"use another checkpoint with --step={others[0]} (steps here: {sorted(steps)})"


def make_manager(directory: str | Path, keep: int) -> ocp.CheckpointManager:
  """For training: keeps the ``keep`` latest steps and the best by validation mean Dice."""
  preservation = policies.AnyPreservationPolicy(
    [
      policies.LatestN(n=keep),
      policies.BestN(
        get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=preservation, create=True, enable_async_checkpointing=True
  )
  try:
    return ocp.CheckpointManager(
      Path(directory).absolute(), options=options, item_names=("state", "data", DIGESTS_ITEM)
    )
  except Exception as e:  # a damaged step's metadata can fail the manager's scan
    raise CheckpointError(f"cannot open the checkpoints in {directory}: {_reason(e)}") from e


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iterator: Any,
  metrics: dict[str, float] | None = None,
) -> None:
  """Saves ``state``, the iterator position and the state's digests as step ``step``."""
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state),
    data=grain.checkpoint.CheckpointSave(data_iterator),
    digests=ocp.args.JsonSave(state_digests(state)),
  )
  try:
    manager.save(step, args=args, metrics=metrics, force=True)
  except Exception as e:  # an earlier async save's failure surfaces here too
    _raise_if_disk_full(manager, e)
    raise


TMP_STEP_GLOB = "*.orbax-checkpoint-tmp*"


def _raise_if_disk_full(manager: ocp.CheckpointManager, error: BaseException) -> None:
  """A save that failed for want of space: its partial step removed, then one line."""
  reason = files.disk_full_reason(error)
  if reason is None:
    return
  directory = Path(manager.directory)
  for partial in directory.glob(TMP_STEP_GLOB):  # never restored, but would block a re-save
    shutil.rmtree(partial, ignore_errors=True)
  raise OutputError(
    f"cannot save a checkpoint in {directory}: {reason}; the partial step was removed and "
    "the last complete one is kept (free space, then rerun the same command to resume)"
  ) from None


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """``manager.wait_until_finished()``; an async save that ran out of space is one line."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    _raise_if_disk_full(manager, e)
    raise


def restore_train_state(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any
) -> Any:
  """The whole TrainState (shardings from ``abstract_state``); the iterator in place.

  Unverified: ``restore_verified`` is what training calls.
  """
  args = ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract_state),
    data=grain.checkpoint.CheckpointRestore(data_iterator),
  )
  return manager.restore(step, args=args).state


def _all_agree(ok: bool) -> bool:
  """True on every process iff ``ok`` on every process (they must decide alike)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _step_problem(manager, step: int, abstract_state: Any, data_iterator: Any):
  """(state, None) if step ``step`` restores and matches its digests; else (None, reason)."""
  step_dir = Path(manager.directory) / str(step)
  try:
    recorded = read_digests(step_dir)
    if data_iterator is None:
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
      state = manager.restore(step, args=args).state
    else:
      state = restore_train_state(manager, step, abstract_state, data_iterator)
    restored = _restored_digests(state)
    saved_step = int(np.asarray(_host_copy(_field(state, "step"))))
    if saved_step != step:
      return None, f"holds the state of step {saved_step}"
    problem = digest_problem(recorded, restored)
    return (None, problem) if problem else (state, None)
  except Exception as e:  # Orbax, tensorstore and JSON raise many types for damaged files
    return None, _reason(e)


def quarantine(manager, steps: list[int]) -> Path:
  """Moves steps out of the manager's folder (kept for inspection) and reloads it."""
  target = Path(manager.directory).parent / QUARANTINE
  if jax.process_index() == 0:
    target.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step in steps:
      shutil.move(str(Path(manager.directory) / str(step)), str(target / f"{step}-{stamp}"))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpoint quarantine")
  manager.reload()
  return target


def restore_verified(
  manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any
) -> tuple[Any, int] | tuple[None, None]:
  """The newest step that restores and verifies: (state, step), the iterator in place.

  Newer steps that fail are logged by step and reason and moved to
  ``W/corrupt_checkpoints/``; (None, None) if the manager holds no step. If no
  step verifies, nothing is moved and a ``CheckpointError`` lists them all.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  failures = []
  for step in steps:
    state, problem = _step_problem(manager, step, abstract_state, data_iterator)
    if _all_agree(problem is None):
      if failures:
        where = quarantine(manager, [s for s, _ in failures])
        for s, why in failures:
          logging.warning("checkpoint step %d fails verification (%s); moved to %s", s, why, where)
        logging.warning("resuming from step %d, the newest checkpoint that verifies", step)
      return state, step
    failures.append((step, problem or "failed on another process"))
  if failures:
    listing = "; ".join(f"step {s}: {why}" for s, why in failures)
    raise CheckpointError(
      f"no checkpoint under {manager.directory} verifies ({listing}). Move that folder "
      "aside to train from scratch"
    )
  return None, None


def newest_verified_step(manager: ocp.CheckpointManager, abstract_state: Any) -> int | None:
  """The newest saved step whose state restores and matches its digests (None if none)."""
  manager.wait_until_finished()
  for step in sorted(manager.all_steps(), reverse=True):
    if _step_problem(manager, step, abstract_state, None)[1] is None:
      return step
  return None


def checkpoint_steps(directory: str | Path) -> list[int]:
  """Finished steps under a training workdir's ``checkpoints/``, read-only (creates nothing)."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
  try:
    return list(manager.all_steps())
  finally:
    manager.close()


def restore_params(directory: str | Path, step: int | None, abstract_params: Any) -> tuple:
  """Only the parameters of step ``step`` (default: the latest): no optimiser state is read.

  Returns ``(params, step)``; shardings come from ``abstract_params``.
  """
  directory = Path(directory).absolute()
  steps = checkpoint_steps(directory)
  if not steps:
    raise CheckpointError(f"no finished checkpoint under {directory}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise CheckpointError(f"no checkpoint of step {step} under {directory}; it has {steps}")
  item = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(
    item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
  )
  where = f"checkpoint step {step} in {directory}"
  try:
    recorded = read_digests(directory / str(step))
  except CheckpointError as e:
    raise CheckpointError(f"{where}: {e}") from None
  try:
    restored = ocp.PyTreeCheckpointer().restore(directory / str(step) / "state", args=args)
  except Exception as e:  # Orbax and tensorstore raise many types for damaged files
    raise CheckpointError(
      f"{where} is damaged and cannot be read ({_reason(e)}); {_other_steps(step, steps)}"
    ) from e
  problem = digest_problem(recorded, array_digests(restored["params"], "params"))
  if problem:
    raise CheckpointError(f"{where}: {problem}; refusing to use it: {_other_steps(step, steps)}")
  return restored["params"], step


# ----- Export folders (written by eval.exporting) ---------------------------------------


def is_export(path: str | Path) -> bool:
  return (Path(path) / "export.json").is_file()


def export_metadata(path: str | Path, format_: str = EXPORT_FORMAT) -> dict:
  """``export.json``, refused unless it is of ``format_`` (a single model's by default)."""
  meta_path = Path(path) / "export.json"
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{meta_path}: cannot read the export's metadata: {e}") from e
  found = meta.get("format") if isinstance(meta, dict) else None
  if found != format_:
    ensemble = f"{path} is an ensemble export (one model per fold): predict --model={path} runs it"
    raise CheckpointError(
      ensemble if found == ENSEMBLE_FORMAT else f"{meta_path}: unknown export format {found!r}"
    )
  return meta


def save_export_params(path: str | Path, params: Any) -> dict:
  """Writes ``params/``; returns their digests, which ``export.json`` records."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save((Path(path) / "params").absolute(), params)
  checkpointer.wait_until_finished()
  return array_digests(params, "params")


def load_export_params(path: str | Path, abstract_params: Any) -> Any:
  """The export's parameters, verified against the digests in ``export.json``."""
  recorded = export_metadata(path).get("param_digests", {})
  try:
    params = ocp.StandardCheckpointer().restore((Path(path) / "params").absolute(), abstract_params)
  except Exception as e:  # Orbax and tensorstore raise many types for damaged files
    raise CheckpointError(f"export {path}: params/ cannot be read: {_reason(e)}") from e
  problem = digest_problem(recorded, array_digests(params, "params"))
  if problem:
    raise CheckpointError(
      f"export {path}: {problem}; refusing to use it (export the workdir again)"
    )
  return params
