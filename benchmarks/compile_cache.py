"""What XLA's persistent compilation cache saves a second process (issue 27, point 5).

  python -m benchmarks.compile_cache --out=DIR [--config=configs/phantom.py:resfuse] [--steps=2]

Runs the same short training (``train_and_evaluate``: its step, validation windows and
every other program) three times, each in a fresh process with a fresh workdir: with
the cache off, then twice sharing one empty cache folder (as every command does by
default: ``--compilation_cache``). Each process sums JAX's own compile events
(``/jax/core/compile/backend_compile_duration``: compiling, or loading from the cache)
and counts cache hits. The data are preprocessed once, before the timed runs.
Writes DIR/compile_cache.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import measure

MODULE = "benchmarks.compile_cache"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
HIT_EVENT = "/jax/compilation_cache/cache_hits"


def train_once(spec: str, steps: int, workdir: str, cache: str) -> dict:
  """Worker: one ``train_and_evaluate`` in this fresh process, its compile seconds summed."""
  import jax

  from resfuse_jax import backend, config_lib, train

  seconds, counts = collections.defaultdict(float), collections.Counter()
  jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **_: seconds.__setitem__(name, seconds[name] + secs)
  )
  jax.monitoring.register_event_listener(lambda name, **_: counts.update([name]))
  backend.apply_rng_default()
  backend.use_compilation_cache(cache or None)
  config = config_lib.load(spec, {"train.steps": steps, "eval.every_steps": steps})
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  return {
    "wall_s": time.perf_counter() - start,
    "compile_s": seconds[COMPILE_EVENT],
    "cache_hits": counts[HIT_EVENT],
  }


WORKERS = {"train_once": train_once}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", help="folder for compile_cache.json and .md")
  p.add_argument("--config", default=str(measure.ROOT / "configs" / "phantom.py") + ":resfuse")
  p.add_argument("--steps", type=int, default=2)
  measure.add_worker_flags(p)
  args = p.parse_args(argv)
  if args.worker:
    measure.run_worker(WORKERS, args.worker, args.kwargs)
    return 0
  if not args.out:
    p.error("--out is required")
  command = f"python -m {MODULE} " + " ".join(sys.argv[1:] if argv is None else argv)
  runs = {}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)

    def run(name, cache):
      kw = {"spec": args.config, "steps": args.steps, "workdir": str(tmp / name), "cache": cache}
      runs[name] = measure.run_isolated(MODULE, "train_once", 3600, **kw)
      print(name, runs[name], flush=True)

    run("warm_data", "")  # preprocesses the data into the user's cache: not timed below
    run("cache_off", "")
    run("first_process", str(tmp / "xla"))
    run("second_process", str(tmp / "xla"))
  for r in runs.values():
    r.pop("workdir", None)
    r.pop("cache", None)
  res = {**measure.environment(command), "runs": runs}
  res["second_over_first_compile"] = (
    runs["second_process"]["compile_s"] / runs["first_process"]["compile_s"]
  )
  measure.write_report(args.out, "compile_cache", res, markdown)
  return 0


def markdown(res: dict) -> str:
  lines = [f"# Compilation cache: {measure.header_line(res)}", "", f"`{res['command']}`", ""]
  lines += ["| process | compile or load (s) | cache hits | wall (s) |", "|---|---|---|---|"]
  for name, r in res["runs"].items():
    lines.append(f"| {name} | {r['compile_s']:.1f} | {r['cache_hits']} | {r['wall_s']:.1f} |")
  lines += ["", f"second process / first: {res['second_over_first_compile']:.2f} of the compile"]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(main())
