"""``export``'s bf16 agreement check: the workdir's validation cases through OpenVINO at
f32 and at bf16 on this machine, recorded as numbers only (`precision.measure`).

Which cases: the first ``max_cases`` of ``splits.json``'s validation cases (also capped
by ``eval.max_cases`` when the config sets one), preprocessed as training did (the
user's preprocessed cache, `data.confined_to_user_cache`). What is recorded when it
cannot run (no OpenVINO, a CPU without BF16, no validation data here, no source workdir):
``measured: false`` and why, which ``predict --precision=bf16`` refuses with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from absl import logging

from resfuse_jax import data
from resfuse_jax.errors import DataError
from resfuse_jax.inference import openvino_runtime, precision
from resfuse_jax.workdir import Workdir

DEFAULT_CASES = 5  # export --agreement_cases: BraTS at 2 threads, about a minute a case


def validation_cases(config, source: Path, max_cases: int) -> list[data.Case]:
  """The first ``max_cases`` validation cases of the workdir ``source``, with labels."""
  val_ids = Workdir(source).read_splits()["val"]
  cap = min(max_cases, int(config.eval.max_cases or max_cases))
  wanted = val_ids[:cap]
  data_config = data.confined_to_user_cache(config.data)
  found = {f.case_id: f for f in data.find_cases(data_config)}
  absent = [c for c in wanted if c not in found]
  if absent:
    raise DataError(f"validation case {absent[0]} of {source} is not under data.root here")
  cache, good, _ = data.prepare(data_config, [found[c] for c in wanted], progress=False)
  return data.load_cases(cache, good)


def _unmeasured(reason: str, **more) -> dict:
  logging.warning("bf16 agreement not measured: %s", reason)
  return {"measured": False, "reason": reason, **more}


def bf16_agreement(
  predictor,
  graph: Path,
  sha256: str,
  source: Path | None,
  max_cases: int = DEFAULT_CASES,
  window: Callable | None = None,
) -> dict:
  """``export.json``'s `precision.KEY` record for ``predictor``'s graph ``graph``.

  ``source``: the workdir whose validation cases are measured; ``window``: builds a
  window function from (graph, digest, precision, regions); default OpenVINO's
  (tests plant a disagreement through it).
  """
  if not openvino_runtime.available():
    return _unmeasured(
      f"openvino was not installed where the export ran: {openvino_runtime.INSTALL_HINT}"
    )
  here = {"cpu": openvino_runtime.cpu()["name"], "openvino": openvino_runtime.version()}
  if window is None:
    if not openvino_runtime.cpu()["bf16"]:
      caps = ", ".join(openvino_runtime.cpu()["capabilities"])
      return _unmeasured(f"the exporting CPU has no BF16 (OpenVINO lists {caps})", **here)
    window = openvino_runtime.OpenVinoWindow
  if source is None or max_cases <= 0:
    why = "no source workdir" if source is None else "export --agreement_cases=0"
    return _unmeasured(f"no validation cases ({why})", **here)
  try:
    cases = validation_cases(predictor.config, source, max_cases)
  except (DataError, OSError) as e:
    return _unmeasured(f"the validation cases could not be read here: {e}", **here)
  start = time.perf_counter()
  regions = predictor.dataset.regions
  windows = {p: window(graph, sha256, p, len(regions)) for p in openvino_runtime.PRECISIONS}
  numbers = precision.measure(windows, cases, predictor.config, regions, predictor.rules)
  record = {"measured": True, **here, **numbers, "seconds": round(time.perf_counter() - start, 1)}
  logging.info("%s", precision.summary(record))
  return record
