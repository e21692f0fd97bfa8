"""What every ``python -m resfuse_jax.X`` command shares around its ``main``."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, logging

from resfuse_jax import writers
from resfuse_jax.errors import Preempted, UserError


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with library logs quieted and user errors reported as one line.

  A ``UserError`` (bad data, config, flag or checkpoint: its message names the
  file and the problem) exits with status 1 and no traceback; a ``Preempted``
  stop (checkpoint saved) exits 0; anything else is a bug and keeps its traceback.
  """

  def wrapped(argv):
    writers.quiet_library_logs()
    try:
      main(argv)
    except UserError as e:
      logging.error("%s", e)
      sys.exit(f"error: {e}")
    except Preempted as e:  # a clean stop: the checkpoint is saved, the job can be requeued
      logging.warning("%s", e)
      sys.exit(0)

  app.run(wrapped)
