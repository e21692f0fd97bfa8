"""What every ``python -m resfuse_jax.X`` command shares around its ``main``."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, logging

from resfuse_jax import writers
from resfuse_jax.data.common import DataError
from resfuse_jax.train import Preempted


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with library logs quieted and bad input reported as one line.

  A ``DataError`` (it names the case, the file and the problem) exits with
  status 1 and no traceback; a ``Preempted`` stop (checkpoint saved) exits 0;
  anything else is a bug and keeps its traceback.
  """

  def wrapped(argv):
    writers.quiet_library_logs()
    try:
      main(argv)
    except DataError as e:
      logging.error("%s", e)
      sys.exit(f"error: {e}")
    except Preempted as e:  # a clean stop: the checkpoint is saved, the job can be requeued
      logging.warning("%s", e)
      sys.exit(0)

  app.run(wrapped)
