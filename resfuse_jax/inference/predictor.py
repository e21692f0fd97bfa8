"""A trained model (training workdir or export folder) -> region probabilities of a case.

The one forward pass of the package: ``window_probabilities`` is what training's
validation, ``evaluate``, ``predict``, ``export`` and the benchmarks run on
each sliding window. Loading reads only the parameters of a checkpoint (no
optimiser state) and imports nothing of training. An ONNX graph (an export's
``model.onnx``, or a workdir's built into the user's cache) can instead be run by
OpenVINO or onnxruntime (`runtimes`): only the window function changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from resfuse_jax import backend as backends
from resfuse_jax import checkpointing, data, models, sharding, workdir
from resfuse_jax.errors import CheckpointError, ConfigError
from resfuse_jax.inference import (
  integrity,
  onnx_runtime,
  openvino_runtime,
  postprocess,
  precision,
  runtimes,
  tiler,
)
from resfuse_jax.task import Task

BACKENDS = runtimes.BACKENDS


def window_probabilities(model: nn.Module, params: Any, tiles: jax.Array) -> jax.Array:
  """tiles [N, d, h, w, 2] (pre, post) -> sigmoid region probabilities [N, d, h, w, R]."""
  return jax.nn.sigmoid(model.apply({"params": params}, tiles[..., 0:1], tiles[..., 1:2]))


def make_sharded_window_fn(model: nn.Module, mesh: jax.sharding.Mesh) -> Callable:
  """jit'ed (params, tiles) -> probabilities with tiles split over 'data' (training's mesh)."""
  return jax.jit(
    lambda params, tiles: window_probabilities(model, params, tiles),
    in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def abstract_params(model: nn.Module, patch_size, sharding_=None) -> Any:
  """Shapes and dtypes of ``model``'s parameters (nothing computed), optionally placed."""
  x = jax.ShapeDtypeStruct((1, *patch_size, 1), jnp.float32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, t)["params"], x)
  if sharding_ is None:
    return shapes
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_), shapes)


def resolve_backend(name: str, path: str | Path, graphs: runtimes.GraphSource | None = None) -> str:
  """``predict --backend``: `runtimes.choose` without its reason."""
  return runtimes.choose(name, path, graphs)[0]


def precision_note(
  settings: runtimes.WindowSettings, backend: str, meta: dict | None, path: Path
) -> str:
  """For bf16, the note `precision.check_bf16` allows it with, or its refusal; f32: "".

  ``meta``: the verified ``export.json`` (None: a training workdir, never measured).
  """
  if settings.precision == "f32":
    return ""
  if backend != "openvino":
    raise ConfigError(
      f"--precision={settings.precision} runs on OpenVINO only; this prediction runs {backend} "
      "(--backend=openvino, with openvino installed)"
    )
  if meta is None:
    raise ConfigError(
      f"--precision={settings.precision} needs an export, whose bf16 agreement was measured "
      f"when it was written; {path} is a training workdir: export it first "
      f"(python -m resfuse_jax.export --workdir={path} --output=E) on a CPU with BF16"
    )
  return precision.check_bf16(meta, path, openvino_runtime.cpu())


def chosen_rules(folder: workdir.Workdir, task: Task, postprocessing: str) -> list | None:
  """The post-processing rules a prediction applies, decided once, when the model loads."""
  if postprocessing == "none":
    return None
  if postprocessing == "auto":
    file = folder.postprocessing_file
    return postprocess.read_rules(file, task.region_names) if file.is_file() else None
  return postprocess.read_rules(postprocessing, task.region_names)


class Predictor:
  """A model with its parameters, one compiled window function for all cases.

  ``window``: another backend's window function (`onnx_runtime.OnnxWindow`); the JAX
  parameters are then read only if a fusion heat map is asked for (``load_params``).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    params: Any,
    step: int,
    rules: list[postprocess.Rule] | None = None,
    window: Callable[[np.ndarray], np.ndarray] | None = None,
    load_params: Callable[[], Any] | None = None,
    num_params: int | None = None,
    task: Task | None = None,
  ):
    self.config = config
    self.task = task if task is not None else Task.from_config(config)  # built once
    self.dataset, self.model = self.task.dataset, self.task.model
    self._params, self._load_params = params, load_params
    self._window, self._num_params = window, num_params
    self.backend = "jax" if window is None else getattr(window, "backend", "onnxruntime")
    self.backend_note = ""  # why this backend (and precision), for the log
    self.step = int(step)
    self.rules = rules  # post-processing per region (None: thresholds and nesting only)
    self._digest: str | None = None  # parameters_sha256, computed on first use
    self._forward = jax.jit(lambda p, t: window_probabilities(self.model, p, t))
    self._fusion_terms = jax.jit(
      lambda p, t: self.model.apply(
        {"params": p}, t[..., 0:1], t[..., 1:2], mutable=[models.FUSION_TERMS]
      )[1]
    )

  @classmethod
  def load(
    cls,
    path: str | Path,
    step: int | None = None,
    backend: str = "jax",
    postprocessing: str = "auto",
    settings: runtimes.WindowSettings | None = None,
    graphs: runtimes.GraphSource | None = None,
  ) -> Predictor:
    """``path``: a training workdir (its latest or ``step`` checkpoint) or an export folder.

    Parameters land on this machine's first device, whatever topology trained them.
    ``postprocessing``: ``auto`` (the rules chosen on validation, when ``path`` has them),
    ``none``, or a ``postprocessing.json`` file. ``backend``: `runtimes.choose`, whose
    ``graphs`` builds a training workdir's ONNX graph; ``settings``: the runtime's knobs.
    """
    path = Path(path)
    if workdir.Workdir(path).is_cross_validation():
      raise CheckpointError(
        f"{path} is a cross-validation: one model per fold, {path}/fold_<k>/; load its folds "
        "together (inference.ensemble: predict and export take W whole) or one fold's folder"
      )
    export = checkpointing.is_export(path)
    meta = integrity.verify_export(path) if export else None  # every file read is covered
    backend, why = runtimes.choose(backend, path, graphs)
    settings = settings or runtimes.WindowSettings()
    note = precision_note(settings, backend, meta, path)
    loaded_note = "; ".join(x for x in (why, note) if x)
    said = f" ({loaded_note})" if loaded_note else ""
    logging.info("window function: %s%s", backend, said)  # before any slow step
    config = workdir.read_config(path)
    task = Task.from_config(config)
    rules = chosen_rules(workdir.Workdir(path), task, postprocessing)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = abstract_params(task.model, task.patch_size, device)
    if export:
      loaded = cls._from_export(path, meta, step, backend, settings, rules, abstract, task)
    else:
      folder = workdir.Workdir(path)
      params, step = checkpointing.restore_params(folder.checkpoints_dir, step, abstract)
      loaded = cls(config, params, step, rules, task=task)
      if backend != "jax":  # the checkpoint's graph, built into the user's cache once
        graph, digest = graphs(loaded, path)
        loaded.use_window(runtimes.make_window(backend, graph, digest, settings, len(task.regions)))
    loaded.backend_note = loaded_note
    return loaded

  @classmethod
  def _from_export(cls, path, meta, step, backend, settings, rules, abstract, task) -> Predictor:
    """`load` of an export folder, whose ``export.json`` ``meta`` was verified."""
    exported_step = int(meta["step"])
    if step is not None and step != exported_step:
      raise CheckpointError(f"{path} is an export of step {exported_step}, not {step}")
    config = task.config

    def params():
      return checkpointing.load_export_params(path, abstract)

    if backend == "jax":
      return cls(config, params(), exported_step, rules, task=task)
    digest = (meta.get("onnx") or {}).get("sha256")
    if not digest:  # a model.onnx that export did not record is not trusted
      raise CheckpointError(
        f"{path / 'export.json'} records no SHA-256 for {onnx_runtime.FILE}: the file was "
        "not written by this export; export the model again"
      )
    window = runtimes.make_window(
      backend, path / onnx_runtime.FILE, digest, settings, len(task.regions)
    )
    return cls(
      config,
      None,
      exported_step,
      rules,
      window=window,
      load_params=params,
      num_params=int(meta["params"]),
      task=task,
    )

  def use_window(self, window: Callable[[np.ndarray], np.ndarray]) -> None:
    """Runs the windows through ``window`` (another runtime's) from now on."""
    self._window, self.backend = window, getattr(window, "backend", "onnxruntime")

  @property
  def params(self) -> Any:
    """The JAX parameters (read on first use when another backend runs the windows)."""
    if self._params is None:
      self._params = self._load_params()
    return self._params

  @property
  def num_params(self) -> int:
    if self._num_params is not None:
      return self._num_params
    return models.count_params(self.params)

  def parameters_sha256(self) -> str:
    """The SHA-256 of the parameters (each leaf's path, dtype, shape and bytes, in tree
    order), whatever backend runs them: what a DICOM SEG records of the model used."""
    if self._digest is None:
      digest = hashlib.sha256()
      for path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]:
        value = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
      self._digest = digest.hexdigest()
    return self._digest

  def parameter_digests(self) -> dict[str, str]:
    return {"parameters_sha256": self.parameters_sha256()}

  def describe(self) -> str:
    """``checkpoint step 600, jax``: what a command's line reports about the model."""
    return f"checkpoint step {self.step}, {self.backend}"

  def window_fn(self) -> Callable[[np.ndarray], np.ndarray]:
    """[N, d, h, w, 2] numpy tiles -> [N, d, h, w, R] numpy probabilities; JAX's is a
    `tiler.JaxWindow`, which the device tiler can also run."""
    if self._window is not None:
      return self._window
    return tiler.JaxWindow(self._forward, self.params)

  def probabilities(self, case: data.Case, tta: bool = False, placement: str = "auto"):
    """[D, H, W, R] region probabilities on the case's (preprocessed) grid.

    ``placement``: where the tiler cuts and blends (`tiler.sliding_window`). Windows per
    call: ``eval.batch_size``, or more where the runtime takes more at once (its
    ``windows_per_call``: ``predict --windows_per_call`` times OpenVINO's requests).
    """
    mirror_axes = (0, 1, 2) if tta else ()
    window = self.window_fn()
    batch = backends.resolve("eval_batch_size", self.config.eval.batch_size)
    batch = max(batch, getattr(window, "windows_per_call", 0))
    return tiler.predict_volume(
      window, case, self.config, batch, mirror_axes=mirror_axes, placement=placement
    )

  def fusion_heat(self, case: data.Case) -> np.ndarray | None:
    """[D, H, W]: where the auxiliary branch changes the main one; None if the model sows
    no ``models.FUSION_TERMS`` (it does not fuse that way).

    The per-level magnitudes are what the one tiler accumulates, in windows that overlap
    only where the volume's end makes them (overlap 0).
    """
    window = tuple(self.config.data.patch_size)
    tile = jax.ShapeDtypeStruct((1, *window, 2), jnp.float32)
    if not jax.tree.leaves(jax.eval_shape(self._fusion_terms, self.params, tile)):
      return None

    def magnitudes(tiles: np.ndarray) -> np.ndarray:  # [n, *window, 2] -> [n, *window, L]
      out = []
      for t in tiles:
        sown = self._fusion_terms(self.params, t[None])
        terms = [np.asarray(x) for x in jax.tree.leaves(sown.get(models.FUSION_TERMS, {}))]
        out.append(np.moveaxis(fusion_magnitudes(terms, window), 0, -1))
      return np.stack(out)

    volume = np.stack([case.pre, case.post], axis=-1)
    mags = tiler.sliding_window(magnitudes, volume, window, overlap=0.0, batch_size=1)
    return fusion_heat_map(np.moveaxis(mags, -1, 0))


def fusion_magnitudes(terms: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
  """|W_l(a_l)| per fused level (channel L2 norm), upsampled to ``shape``: [L, *shape].

  ``terms``: one [1, d, h, w, C] array per level, as sown into ``models.FUSION_TERMS``.
  """
  from scipy import ndimage

  maps = []
  for term in terms:
    mag = np.linalg.norm(np.asarray(term)[0], axis=-1)
    maps.append(ndimage.zoom(mag, [s / m for s, m in zip(shape, mag.shape)], order=1))
  return np.stack(maps) if maps else np.zeros((0, *shape), np.float32)


def fusion_heat_map(magnitudes: np.ndarray) -> np.ndarray:
  """[L, D, H, W] -> [D, H, W]: each level scaled to [0, 1] over the volume, then averaged.

  Where the auxiliary (pre-contrast) branch changes the main branch (the paper's Fig. 4).
  """
  if len(magnitudes) == 0:
    return np.zeros(magnitudes.shape[1:], np.float32)
  peak = magnitudes.reshape(len(magnitudes), -1).max(axis=1)
  return (magnitudes / np.maximum(peak, 1e-12)[:, None, None, None]).mean(axis=0)
