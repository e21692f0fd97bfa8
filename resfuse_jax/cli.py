"""What every ``python -m resfuse_jax.X`` command shares around its ``main``."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, logging

from resfuse_jax import writers
from resfuse_jax.data.common import DataError


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with library logs quieted and bad input reported as one line.

  A ``DataError`` (it names the case, the file and the problem) exits with
  status 1 and no traceback; anything else is a bug and keeps its traceback.
  """

  def wrapped(argv):
    writers.quiet_library_logs()
    try:
      main(argv)
    except DataError as e:
      logging.error("%s", e)
      sys.exit(f"error: {e}")

  app.run(wrapped)
