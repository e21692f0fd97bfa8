"""Atomic writes of result files: a reader sees the old file or the new one, never half.

Every JSON, CSV and markdown result goes through here: written to a temporary
file in the same folder, flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> Path:
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    with tmp.open("w", newline="") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path


def write_json(path: str | Path, obj: Any) -> Path:
  return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
