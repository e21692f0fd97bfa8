"""Worker processes that never outlive the command that started them.

SIGTERM to the parent (a scheduler's cancel, ``kill``) becomes an exception in its
main thread, so the queued work is cancelled and every worker terminated before exit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import signal
import threading

from resfuse_jax.data.common import DataError


class Terminated(SystemExit):
  """SIGTERM while worker processes run: they are ended before the exit."""


def _raise_terminated(signum, frame):
  del frame
  raise Terminated(128 + signum)


@contextlib.contextmanager
def _sigterm_raises():
  """SIGTERM becomes an exception in the main thread (so the workers can be ended)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _end_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
  """Cancels what has not started and terminates the workers (none outlives the build)."""
  processes = list((getattr(pool, "_processes", None) or {}).values())
  pool.shutdown(wait=False, cancel_futures=True)
  for p in processes:
    if p.is_alive():
      p.terminate()
  for p in processes:
    p.join(timeout=10)
    if p.is_alive():
      p.kill()


def run_in_processes(fn, todo, args, record, workers: int, progress) -> None:
  """``fn(item, *args)`` for every item in ``workers`` spawned processes.

  A ``DataError`` goes to ``record(error, item)``; anything else (SIGTERM included)
  ends the workers and is raised.
  """
  ctx = multiprocessing.get_context("spawn")  # JAX may be loaded: never fork it
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
  with _sigterm_raises():
    try:
      futures = {pool.submit(fn, f, *args): f for f in todo}
      for fut in progress(concurrent.futures.as_completed(futures)):
        try:
          fut.result()
        except DataError as e:
          record(e, futures[fut])
    except BaseException:
      _end_workers(pool)
      raise
  pool.shutdown()
