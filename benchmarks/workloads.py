"""What the benchmarks time, written once for the CPU suite and the GPU check alike.

Each workload takes a resolved config (sizes, model, compute dtype already set) and
returns one record; measure.py does the timing, compilation and analysis. Records
carry ``ms`` (the median) where a time is the headline, beside the raw times.
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import measure


def random_volume(shape) -> np.ndarray:
  """[*shape, 2] (pre, post) normal noise: a whole volume's cost does not depend on content."""
  return np.random.default_rng(0).normal(size=(*shape, 2)).astype(np.float32)


# --- JAX -----------------------------------------------------------------------------------------


def jax_step(config, steps: int, warmup: int = 1, augmented: bool = False) -> dict:
  """Training's step on random patches (or crops), state donated, compiled apart."""
  from resfuse_jax import models

  step = measure.train_step(config, augmented=augmented)
  compiled = measure.compile_jitted(step.step, step.state, step.batch)
  timing = measure.time_calls(lambda: step(compiled.executable), steps, warmup)
  return {
    "params": models.count_params(step.state.params),
    "compile_s": compiled.compile_s,
    "first_step_s": timing.first_s,
    "step_times_s": timing.times_s,
    "ms": 1e3 * timing.median_s,
    "flops": compiled.flops,
    "bytes_accessed": compiled.bytes_accessed,
    "xla_memory_gb": compiled.memory_bytes / 2**30,
    **measure.achieved(compiled, timing.median_s),
    "device_peak_mb": measure.device_peak_mb(),
    "dtype": str(models.compute_dtype(config.train)),
    "plan": str(step.model.conv_impl),
  }


def step_profile(config, warmup: int = 2, top: int = 12) -> dict:
  """Where one step's device time goes: XLA op events of a traced step, summed per kind.

  On a GPU only the device planes count (the host's launch events would count each op
  twice); on a CPU the host's XLA op events are the device time.
  """
  import jax

  from benchmarks import profile_step

  step = measure.train_step(config)
  for _ in range(warmup):  # compiles (the persistent cache makes a repeat of jax_step's cheap)
    step()
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    (pb,) = Path(tmp).rglob("*.xplane.pb")
    trace = pb.read_bytes()
  events = profile_step.op_events(trace, device_only=True)
  if not events:
    raise RuntimeError("the trace holds no XLA op events (this jax build emits none)")
  by_kind, by_op = collections.Counter(), collections.Counter()
  for name, seconds in events:
    by_kind[profile_step.kind_of(name)] += seconds
    by_op[name] += seconds
  total = sum(by_kind.values())
  return {
    "ms": 1e3 * wall,
    "ops_ms": 1e3 * total,
    "ops": len(events),
    "by_kind_ms": {k: 1e3 * v for k, v in by_kind.most_common()},
    "by_kind_share": {k: v / total for k, v in by_kind.most_common()},
    "top_ops_ms": [[k, 1e3 * v] for k, v in by_op.most_common(top)],
    "trace_lines": profile_step.trace_lines(trace),
  }


def jax_window(config):
  """A freshly initialised model's window function (`tiler.JaxWindow`), jitted once."""
  import jax
  import jax.numpy as jnp

  from resfuse_jax.inference import predictor, tiler

  model = measure.build_model(config)
  dummy = jnp.zeros((1, *config.data.patch_size, 1))
  params = jax.jit(model.init)(jax.random.key(0), dummy, dummy)["params"]
  forward = jax.jit(lambda p, tiles: predictor.window_probabilities(model, p, tiles))
  return tiler.JaxWindow(forward, params)


def save_output(out: np.ndarray, path: str | None) -> None:
  """The volume's probabilities for the agreement between backends (``np.save``)."""
  if path:
    np.save(path, np.asarray(out, np.float32))


def jax_volume(
  config, shape, batch: int, placement: str = "host", repeats: int = 1, out: str | None = None
) -> dict:
  """Whole-volume inference through the package's one tiler (Gaussian, 50% overlap).

  Warm-up: one batch of windows on the host (the window function compiles), one whole
  volume on the device (the tiling program compiles for this volume's shape).
  """
  from resfuse_jax.inference import tiler

  window, volume = jax_window(config), random_volume(shape)
  patch, last = tuple(config.data.patch_size), {}

  def run():
    last["out"] = tiler.sliding_window(
      window, volume, patch, overlap=0.5, batch_size=batch, placement=placement
    )

  t = time.perf_counter()
  run() if placement == "device" else window(np.zeros((batch, *patch, 2), np.float32))
  warmup_s = time.perf_counter() - t
  timing = measure.time_calls(run, repeats, warmup=0)
  save_output(last["out"], out)
  return {
    "warmup_s": warmup_s,
    "volume_s": timing.median_s,
    "ms": 1e3 * timing.median_s,
    "out_shape": list(last["out"].shape),
    "placement": placement,
  }


def onnx_export(config, path: str) -> dict:
  """Writes `jax_window`'s model and parameters (same init) as ``path`` (model.onnx)."""
  from resfuse_jax.serving import onnx_graph

  window = jax_window(config)
  model = measure.build_model(config)
  t = time.perf_counter()
  proto = onnx_graph.to_onnx(model, window.params, tuple(config.data.patch_size))
  Path(path).write_bytes(proto.SerializeToString())
  return {"export_s": time.perf_counter() - t, "bytes": Path(path).stat().st_size}


def onnxruntime_volume(config, shape, batch: int, path: str, out: str | None = None) -> dict:
  """``path`` (from `onnx_export`, as a deployer has the file) run by onnxruntime through
  the package's tiler, the partial last batch as it is."""
  import onnxruntime

  from resfuse_jax.inference import onnx_runtime

  predict = onnx_runtime.OnnxWindow(path)  # warm-up: one batch, as recorded before issue 31
  record = runtime_volume(predict, config, shape, batch, out, time.perf_counter())
  return {**record, "onnxruntime": onnxruntime.__version__, "tiles_per_run": predict.max_batch}


def runtime_volume(predict, config, shape, batch: int, out: str | None, started: float) -> dict:
  """One volume through the package's tiler with another runtime's window function: the
  warm-up (from ``started``: loading, compiling, one batch) and the volume timed apart."""
  from resfuse_jax.inference import tiler

  volume, patch = random_volume(shape), tuple(config.data.patch_size)
  predict(np.zeros((batch, *patch, 2), np.float32))
  warm = time.perf_counter() - started
  t = time.perf_counter()
  probs = tiler.sliding_window(predict, volume, patch, overlap=0.5, batch_size=batch)
  volume_s = time.perf_counter() - t
  save_output(probs, out)
  return {
    "warmup_s": warm,
    "volume_s": volume_s,
    "ms": 1e3 * volume_s,
    "out_shape": list(probs.shape),
  }


def openvino_volume(
  config,
  shape,
  batch: int,
  path: str,
  precision: str = "f32",
  threads: int = 0,
  streams: int = 0,
  max_batch: int | None = None,
  out: str | None = None,
) -> dict:
  """``path`` run by OpenVINO through the package's tiler; ``batch`` windows per tiler call,
  ``max_batch`` per inference request, ``streams`` requests in flight (0: OpenVINO's own).

  Compiled without the model cache: the warm-up is a first use's compile.
  """
  from resfuse_jax.inference import openvino_runtime

  t = time.perf_counter()
  predict = openvino_runtime.OpenVinoWindow(
    path, precision=precision, threads=threads, streams=streams, max_batch=max_batch,
    cache=False,
  )  # fmt: skip
  return {
    **runtime_volume(predict, config, shape, batch, out, t),
    "openvino": openvino_runtime.version(),
    "precision": precision,
    "windows_per_request": predict.max_batch,
    "windows_per_call": predict.windows_per_call,
  }


# --- PyTorch / MONAI -----------------------------------------------------------------------------


def torch_device():
  import torch

  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_model(config):
  """The PyTorch twin of the config's model (benchmarks/torch_reference.py), on the device."""
  from benchmarks import torch_reference

  num_outputs = len(measure.regions(config))
  net = torch_reference.build(config.model.name, config.model.features, num_outputs)
  return net.to(torch_device())


def torch_step(config, steps: int, dtype: str = "float32", warmup: int = 1) -> dict:
  """The reference step (AdamW, clipping, channels_last_3d; bf16 autocast when asked)."""
  import torch

  from benchmarks import torch_reference

  net, dev = torch_model(config), torch_device()
  step = torch_reference.make_train_step(net, measure.regions(config), config.train.lr, dtype=dtype)
  b, patch = config.train.batch_size, tuple(config.data.patch_size)
  rng, fmt = np.random.default_rng(0), torch.channels_last_3d
  pre, post = (
    torch.from_numpy(rng.normal(size=(b, 1, *patch)).astype(np.float32)).to(dev, memory_format=fmt)
    for _ in range(2)
  )
  label = torch.from_numpy(rng.integers(0, 4, size=(b, *patch))).to(dev)
  timing = measure.time_calls(lambda: step(pre, post, label), steps, warmup)
  return {
    "params": torch_reference.count_params(net),
    "first_step_s": timing.first_s,
    "step_times_s": timing.times_s,
    "ms": 1e3 * timing.median_s,
  }


def monai_volume(config, shape, batch: int, bf16: bool = False, repeats: int = 1) -> dict:
  """MONAI's sliding_window_inference (Gaussian, sigma = window/8, 50% overlap) of the
  PyTorch twin; warm-up: one batch of windows."""
  import torch
  from monai.inferers import sliding_window_inference

  net, dev = torch_model(config).eval(), torch_device()
  patch = tuple(config.data.patch_size)
  x = torch.from_numpy(random_volume(shape)).permute(3, 0, 1, 2)[None].contiguous().to(dev)

  def predictor(tiles):
    tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
    return torch.sigmoid(net(tiles[:, 0:1], tiles[:, 1:2]).float())

  def infer(fn, *args):
    with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
      out = fn(*args)
    if dev.type == "cuda":
      torch.cuda.synchronize()
    return out

  t = time.perf_counter()
  infer(predictor, torch.zeros(batch, 2, *patch, device=dev))
  warm, last = time.perf_counter() - t, {}

  def run():
    last["out"] = infer(
      sliding_window_inference, x, patch, batch, predictor, 0.5, "gaussian", 0.125
    )

  timing = measure.time_calls(run, repeats, warmup=0)
  return {
    "warmup_s": warm,
    "volume_s": timing.median_s,
    "ms": 1e3 * timing.median_s,
    "out_shape": list(last["out"].shape),
  }


# --- the host data path --------------------------------------------------------------------------


def crops_per_second(config, cases, workers: int, batches: int, threads: int | None = None):
  """Patches/s out of training's Grain pipeline (nnU-Net's crop margin), after start-up."""
  from absl import flags

  from resfuse_jax.data import pipeline

  flags.FLAGS.mark_as_parsed()
  extra = {} if threads is None else {"read_threads": threads}
  it = iter(
    pipeline.train_dataset(
      cases,
      patch_size=tuple(config.data.patch_size),
      batch_size=config.train.batch_size,
      regions=measure.parts(config).regions,
      fg_fraction=1 / 3,
      seed=0,
      crop_shape=measure.crop_shape(config),
      workers=workers,
      **extra,
    )
  )
  for _ in range(10):  # past the start-up and the first fill of the prefetch buffer
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * config.train.batch_size / (time.perf_counter() - t)


def memmapped_cases(folder: Path, shape, n: int) -> list:
  """``n`` random cases saved and memory-mapped as the preprocessed cache keeps them."""
  from resfuse_jax import data

  rng, cases = np.random.default_rng(0), []
  for i in range(n):
    arrays = {}
    for key in ("pre", "post", "label"):
      if key == "label":
        value = (rng.random(shape) < 0.02).astype(np.uint8) * 3
      else:
        value = rng.normal(size=shape).astype(np.float32)
      np.save(folder / f"{i}_{key}.npy", value)
      arrays[key] = np.load(folder / f"{i}_{key}.npy", mmap_mode="r")
    cases.append(
      data.Case(f"c{i}", arrays["pre"], arrays["post"], arrays["label"], (1.0,) * 3,
                np.eye(4), tuple(shape), tuple((0, s) for s in shape))
    )  # fmt: skip
  return cases


def data_path(config, case_shape, cases: int, workers: int, threads: int, batches: int) -> dict:
  """Crops/s from memory-mapped random cases: ``workers`` processes, ``threads`` readers."""
  with tempfile.TemporaryDirectory() as tmp:
    loaded = memmapped_cases(Path(tmp), case_shape, cases)
    rate = crops_per_second(config, loaded, workers, batches, threads)
  crop = list(measure.crop_shape(config))
  return {"patches_per_s": rate, "workers": workers, "threads": threads, "crop": crop}


def resident_path(config, case_shape, cases: int, batches: int, dtype: str = "float32") -> dict:
  """Crops/s of the device-resident sampler (issue 28) on the same cases, crop and batch as
  `data_path`: cases packed and placed once, then one jitted draw-and-cut per batch."""
  import jax
  import jax.numpy as jnp

  from resfuse_jax.data import resident
  from resfuse_jax.train import resident as device_resident

  patch, crop = tuple(config.data.patch_size), measure.crop_shape(config)
  batch = config.train.batch_size
  with tempfile.TemporaryDirectory() as tmp:
    loaded = memmapped_cases(Path(tmp), case_shape, cases)
    t = time.perf_counter()
    packed = resident.pack(loaded, measure.parts(config).regions, patch, crop, dtype)
    arrays = device_resident.to_device(packed)
    jax.block_until_ready(arrays)
    load_s = time.perf_counter() - t

  @jax.jit
  def draw(step):
    keys = device_resident.sample_keys(0, step, batch)
    return device_resident.sample_crops(arrays, keys, patch, crop, 1 / 3)

  jax.block_until_ready(draw(jnp.asarray(0)))  # compiles
  timing = measure.time_calls(lambda: jax.block_until_ready(draw(jnp.asarray(1))), batches)
  return {
    "patches_per_s": batch / timing.median_s,
    "ms_per_batch": 1e3 * timing.median_s,
    "resident_mb_per_case": packed.nbytes / cases / 2**20,
    "load_s": load_s,
    "dtype": dtype,
    "crop": list(crop),
  }


def phantom_pipeline(config, shape, cases: int, worker_counts, batches: int) -> dict:
  """Patches/s from the preprocessed cache of BraTS-layout phantom cases (built first)."""
  from resfuse_jax import data
  from resfuse_jax.data import brats, phantom

  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    spec = phantom.PhantomSpec(num_cases=cases, shape=tuple(shape), spacing=1.0, seed=0)
    files = brats.find_cases(phantom.write_phantom(Path(tmp) / "brats", spec))
    config.data.cache_dir = str(Path(tmp) / "cache")
    prepared, ids, _ = data.prepare(config.data, files, workers=2, progress=False)
    loaded = data.load_cases(prepared, ids)
    for workers in worker_counts:
      rate = crops_per_second(config, loaded, workers, batches)
      out[f"patches_per_s_{workers}_workers"] = rate
  return out


def matmul_rate(n: int = 2048, reps: int = 10) -> dict:
  """FLOP/s of XLA's float32 matmul on this machine: the practical peak to compare to."""
  import jax
  import jax.numpy as jnp

  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
  f = jax.jit(lambda a: a @ a)
  timing = measure.time_calls(lambda: jax.block_until_ready(f(a)), reps)
  return {"flops_per_s": 2 * n**3 / timing.median_s}
