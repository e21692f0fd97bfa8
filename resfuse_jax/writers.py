"""Metric writers: TensorBoard event files via tensorboardX, plus the console.

clu's ``metric_writers`` package imports TensorFlow at import time (its
TensorBoard writer is built on ``tf.summary``); pulling TensorFlow into every
install for event files is a ~600 MB dependency for a JAX project. The writer
here keeps clu's MetricWriter method names so it can be swapped back.
"""

from __future__ import annotations

import logging as std_logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import logging


class TensorBoardWriter:
  """clu-compatible ``write_scalars`` / ``write_hparams`` / ``flush`` / ``close``."""

  def __init__(self, logdir: str | Path):
    from tensorboardX import SummaryWriter

    self._writer = SummaryWriter(logdir=str(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    text = "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items()))
    self._writer.add_text("config", text, global_step=0)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class NullWriter:
  """For processes other than 0, which must not write logs."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    del step, scalars

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def create(logdir: str | Path, just_logging: bool) -> TensorBoardWriter | NullWriter:
  if just_logging:
    return NullWriter()
  logging.info("TensorBoard event files go to %s", logdir)
  return TensorBoardWriter(logdir)


class _QuietLibraries:
  """Drops INFO chatter of Orbax and Grain (every save logs ~30 lines), and two lines that
  every command would print for nothing: JAX's "Unable to initialize backend 'tpu'" (no
  libtpu on a CPU or GPU machine) and Orbax's "read only" warnings when evaluate, predict
  and export open a checkpoint read-only, as they mean to. Other warnings are kept."""

  NOISY = ("/orbax/", "/grain/")
  EXPECTED = (
    ("xla_bridge", "Unable to initialize backend 'tpu'"),
    ("/orbax/", "read_only=True"),
    ("/orbax/", "Given directory is read only"),
  )

  def filter(self, record) -> bool:
    if any(
      where in record.pathname and text in record.getMessage() for where, text in self.EXPECTED
    ):
      return False
    if record.levelno >= std_logging.WARNING or logging.get_verbosity() > 0:
      return True
    return not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs() -> None:
  """Call from a command's main(), after absl has installed its handler."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
