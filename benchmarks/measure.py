"""The one benchmark harness: how a number is measured, run within a budget and written down.

The CPU suite (suite.py) and the GPU check (gpu_check.py) are lists of `Measurement`s
run by `run_measurements`; what they time (workloads.py) goes through this module's
timing, compilation, XLA cost and memory analysis, worker processes and report
writing, so both report the same quantities the same way. The project's training
step and model are reached through `train_step` and `build_model` only: when
training's modules move, this is the one place that follows them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# --- the project's parts ------------------------------------------------------------------------


def parts(config):
  """The config's parts (model, regions, crop, augmentation) as every command gets them."""
  from resfuse_jax import task

  return task.Task.from_config(config)


def build_model(config):
  """The config's model for its dataset's regions (what predict and training build)."""
  return parts(config).model


def regions(config) -> tuple[tuple[int, ...], ...]:
  return parts(config).region_values


def crop_shape(config) -> tuple[int, ...]:
  """The host crop training's step takes: the patch plus augmentation's margin."""
  return parts(config).crop_shape


@dataclasses.dataclass
class TrainStep:
  """Training's own jitted step (state donated) with a state and a random host batch."""

  step: Any
  state: Any
  batch: dict
  model: Any
  augmentation: Any  # training's augmentation spec of the config

  def __call__(self, compiled=None) -> None:
    """One step, blocking; ``compiled``: the step's compiled executable, if lowered apart."""
    import jax

    self.state, metrics = (compiled or self.step)(self.state, self.batch)
    jax.block_until_ready(metrics)


def train_step(config, augmented: bool = False) -> TrainStep:
  """The project's training step for ``config``, as training assembles it.

  ``augmented``: augmentation on the device inside the step (crops in), else patches in.
  """
  import jax

  from resfuse_jax import train

  task = parts(config)
  model, tx = task.model, train.make_optimizer(config.train)
  state = jax.jit(lambda k: train.init_state(model, tx, task.patch_size, k))(jax.random.key(0))
  step = train.make_step_fn(config, model, tx, task.region_values, augmented=augmented)
  batch = random_batch(train.input_shapes(config, augmented))
  return TrainStep(jax.jit(step, donate_argnums=0), state, batch, model, task.augmentation)


def use_compilation_cache(folder: str) -> None:
  """XLA's persistent cache: a step compiled twice in a run (or by a worker) compiles once."""
  import jax

  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def random_batch(shapes: dict) -> dict:
  """Device arrays of ``shapes`` (jax.ShapeDtypeStruct): normal images, labels 0-3."""
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  out = {}
  for key, s in shapes.items():
    if np.issubdtype(s.dtype, np.integer):
      out[key] = jnp.asarray(rng.integers(0, 4, size=s.shape).astype(s.dtype))
    else:
      out[key] = jnp.asarray(rng.normal(size=s.shape).astype(s.dtype))
  return out


# --- timing, compilation, cost, memory ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
  first_s: float  # the first warm-up call (where nothing compiled it before, compilation too)
  times_s: list[float]

  @property
  def median_s(self) -> float:
    return float(np.median(self.times_s))

  @property
  def best_s(self) -> float:
    return float(min(self.times_s))


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
  """``fn`` must block (``jax.block_until_ready``, ``torch.cuda.synchronize``)."""
  first = math.nan
  for i in range(warmup):
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t if i == 0 else first
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return Timing(first, times)


@dataclasses.dataclass(frozen=True)
class Compiled:
  executable: Any
  compile_s: float  # lowering and XLA compilation
  flops: float  # XLA's cost analysis
  bytes_accessed: float
  memory_bytes: float  # XLA's memory analysis: temp + arguments + outputs - aliased


def compile_jitted(jitted, *args) -> Compiled:
  """Lowers and compiles ``jitted`` for ``args``, timed, with XLA's cost and memory analysis."""
  t = time.perf_counter()
  executable = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t
  cost = executable.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}  # older jax: one dict per device
  from resfuse_jax.planning.memory import step_memory_bytes  # the planner's own measure

  memory = step_memory_bytes(executable.memory_analysis())
  flops, moved = float(cost.get("flops", math.nan)), float(cost.get("bytes accessed", math.nan))
  return Compiled(executable, compile_s, flops, moved, memory)


def achieved(compiled: Compiled, seconds: float) -> dict:
  """The rates a step's time means: TFLOP/s and TB/s of what XLA says it computes and moves."""
  return {
    "tflops_per_s": compiled.flops / seconds / 1e12,
    "tb_per_s": compiled.bytes_accessed / seconds / 1e12,
  }


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb() -> float | None:
  """The accelerator's peak allocation so far (None where the backend keeps no statistics)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


# --- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measurement:
  """One named number: ``run()`` returns its record; lists run in their order (what decides
  most first), and one is skipped when less than ``expected_s`` of the budget is left."""

  name: str
  run: Callable[[], dict]
  expected_s: float = 0.0


def run_measurements(
  measurements: Iterable[Measurement],
  budget_s: float = math.inf,
  only: Sequence[str] = (),
  log: Callable[[str], None] = print,
) -> tuple[dict[str, dict], bool]:
  """Runs each measurement (``only``: name prefixes) within ``budget_s`` seconds.

  Returns ({name: record}, whether any failed). A skip records why; a failure records
  its error and traceback without losing the others; every record gets its ``wall_s``.
  """
  start, results, failed = time.perf_counter(), {}, False
  for m in measurements:
    if only and not any(m.name.startswith(o) for o in only):
      continue
    left = budget_s - (time.perf_counter() - start)
    if left < m.expected_s:
      results[m.name] = {"skipped": f"{left:.0f} s of budget left, needs ~{m.expected_s:.0f} s"}
      log(f"--- {m.name}: skipped (budget)")
      continue
    t = time.perf_counter()
    try:
      results[m.name] = dict(m.run())
    except Exception as e:  # noqa: BLE001 - one failure must not lose the other measurements
      failed = True
      results[m.name] = {
        "error": f"{type(e).__name__}: {str(e)[:300]}",
        "traceback": traceback.format_exc()[-3000:],
      }
    results[m.name]["wall_s"] = time.perf_counter() - t
    shown = {k: v for k, v in results[m.name].items() if k != "traceback"}
    log(f"--- {m.name}: {json.dumps(shown, default=str)[:600]}")
  return results, failed


def environment(command: str) -> dict:
  """What a number was measured on and with: the header of every results file."""
  import jax

  versions = {"jax": jax.__version__}
  for module in ("torch", "onnxruntime"):
    try:
      versions[module] = __import__(module).__version__
    except ImportError:
      pass
  return {
    "device": str(jax.devices()[0]),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
    "versions": versions,
    "commit": git_commit(),
    "command": command,
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }


def git_commit() -> str:
  """The measured code's commit (``+dirty`` with uncommitted changes); '' outside git."""
  try:
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=10)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout
  except (OSError, subprocess.SubprocessError):
    return ""
  return head + ("+dirty" if head and dirty.strip() else "")


# --- worker processes ----------------------------------------------------------------------------


def worker_command(module: str, kind: str, kwargs: dict) -> list[str]:
  """The command line of one measurement in a fresh process (cwd: the repository root)."""
  return [sys.executable, "-m", module, "--worker", kind, "--kwargs", json.dumps(kwargs)]


def run_isolated(module: str, kind: str, timeout_s: float | None = None, **kwargs) -> dict:
  """``module``'s worker ``kind`` in a fresh process: its peak RSS is its own, and flags XLA
  reads once (the GPU conv layout) take effect. Returns ``{**kwargs, **its record}``."""
  cmd = worker_command(module, kind, kwargs)
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
  if proc.returncode != 0:
    raise RuntimeError(f"{kind} {kwargs} failed:\n{proc.stderr[-4000:]}")
  return {**kwargs, **json.loads(proc.stdout.strip().splitlines()[-1])}


def add_worker_flags(parser) -> None:
  import argparse

  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)


def run_worker(workers: dict[str, Callable[..., dict]], kind: str, kwargs_json: str) -> dict:
  """The worker side of `run_isolated`: prints the record (and peak RSS) as its last line."""
  result = {**workers[kind](**json.loads(kwargs_json)), "peak_rss_mb": peak_rss_mb()}
  print(json.dumps(result))
  return result


# --- results files -------------------------------------------------------------------------------


def write_report(folder: Path, stem: str, res: dict, render: Callable[[dict], str]) -> dict:
  """``folder/stem.json`` and ``folder/stem.md`` (``render(res)``); prints the markdown."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{stem}.json").write_text(json.dumps(res, indent=2))
  text = render(res)
  (folder / f"{stem}.md").write_text(text)
  print(text)
  return res


def merge_section(path: Path, section: str, value: Any, header: dict) -> dict:
  """``path``'s results with one section replaced, its own command and date kept beside it."""
  path = Path(path)
  if not path.is_file():
    raise SystemExit(f"--only={section} merges into {path}, which does not exist: run it whole")
  res = json.loads(path.read_text())
  res[section] = value
  keep = ("command", "date", "versions", "commit")
  res.setdefault("sections", {})[section] = {k: header[k] for k in keep if k in header}
  return res


def table(columns: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
  """Markdown table lines."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def records_table(results: dict[str, dict]) -> list[str]:
  """{name: record} as a table: ms where timed, then every other scalar of the record."""

  def cell(k, x):
    return f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}"

  rows = []
  for name, r in results.items():
    ms = f"{r['ms']:.2f}" if "ms" in r else ""
    hidden = ("ms", "error", "traceback")
    rest = ", ".join(
      cell(k, x) for k, x in r.items() if k not in hidden and not isinstance(x, list | dict)
    )
    rows.append([name, ms, f"ERROR {r['error']}" if "error" in r else rest])
  return table(["measurement", "ms", "other"], rows)


def header_line(env: dict) -> str:
  """One line naming the machine, the versions, the commit and the date of a run."""
  versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
  commit = f", commit {env['commit']}" if env.get("commit") else ""
  return f"{env['device']}, {env.get('cpu_count', '?')} CPUs, {versions}{commit} ({env['date']})"
