"""Reading export folders written by ``python -m resfuse_jax.export`` (no flags here, so
both the CLIs and the library can import it)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp

from resfuse_jax.data.common import DataError

FORMAT = "resfuse_jax-export-1"
SERVING_FILE = "serving/window.jax_export"


def is_export(path: str | Path) -> bool:
  return (Path(path) / "export.json").is_file()


def metadata(path: str | Path) -> dict:
  meta = json.loads((Path(path) / "export.json").read_text())
  if meta.get("format") != FORMAT:
    raise DataError(f"{path}/export.json: unknown export format {meta.get('format')!r}")
  return meta


def load_config(path: str | Path) -> ml_collections.ConfigDict:
  metadata(path)
  return ml_collections.ConfigDict(json.loads((Path(path) / "config.json").read_text()))


def load_params(path: str | Path, abstract_params) -> dict:
  return ocp.StandardCheckpointer().restore((Path(path) / "params").absolute(), abstract_params)


def load_serving(path: str | Path) -> jax.export.Exported:
  """The serialized window function; ``load_serving(E).call(tiles)`` runs it."""
  return jax.export.deserialize(bytearray((Path(path) / SERVING_FILE).read_bytes()))
