"""Device-resident training data against the host pipeline (issue 28), side by side in one run.

  python -m benchmarks.resident_data --out=benchmarks/results/resident_data [--size=brats|tiny]

Measures, on whatever backend JAX starts (the CPU here; the GPU check has the GPU's row):

* crops/s of the host pipeline (Grain, in-process, the training default) and of the
  resident sampler (padded layout, float32 and bfloat16 storage) on the same memory-mapped
  cases, patch, crop and batch;
* the other layout the issue asks about: every case in a flat buffer at its own padded
  shape, the crop gathered with computed indices (`flat_cut`), its crops/s and bytes;
* resident bytes per case of both layouts for cases whose shapes differ (±15 %);
* the sampler's share of the step: the jitted training step drawing its crops from the
  resident set against the same step given a batch already on the device.

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import measure, workloads

SIZES = {
  # BraTS training at the nnU-Net augmentation preset: 128³ patches in 206³ crops, cases at a
  # brain's non-zero box (~3.4 M voxels; the MNI-layout set averages 4.3 M).
  "brats": {"patch": 128, "batch": 2, "case_shape": (140, 172, 140), "cases": 6, "batches": 10,
            "step_patch": 64, "step_features": (8, 16, 32), "steps": 5},
  "tiny": {"patch": 16, "batch": 2, "case_shape": (40, 44, 36), "cases": 4, "batches": 5,
           "step_patch": 16, "step_features": (4, 8), "steps": 3},
}  # fmt: skip


def config_for(patch: int, batch: int, features=None):
  from resfuse_jax import config_lib

  values = {"data.patch_size": (patch,) * 3, "train.batch_size": batch}
  if features:
    values["model.features"] = features
  return config_lib.load(f"{measure.ROOT / 'configs' / 'brats.py'}:resfuse", values)


def varied_shapes(shape, n: int, spread: float = 0.15) -> list[tuple[int, int, int]]:
  rng = np.random.default_rng(0)
  return [tuple(int(s * rng.uniform(1 - spread, 1 + spread)) for s in shape) for _ in range(n)]


def layout_bytes(shapes, regions: int, patch, crop) -> dict:
  """Bytes per case (float32 / bfloat16 scans) of the padded layout and of a flat buffer."""
  from resfuse_jax.data import resident

  margin = resident.margin_of(patch, crop)
  own = [
    int(np.prod([max(s[a], patch[a]) + 2 * margin[a] for a in range(3)])) for s in shapes
  ]  # fmt: skip
  out = {}
  for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
    padded = resident.resident_bytes(shapes, regions, patch, crop, dtype) / len(shapes)
    tables = regions * (resident.LOCATIONS * 3 + 1) * 4 + 12
    out[dtype] = {
      "padded_mb_per_case": padded / 2**20,
      "flat_mb_per_case": (np.mean(own) * (2 * itemsize + 1) + tables) / 2**20,
    }
  return out


def flat_pack(cases, patch, crop):
  """Every case at its own padded shape, one after another: (scans [T, 2], labels [T],
  offsets [N], padded shapes [N, 3], case shapes [N, 3])."""
  from resfuse_jax.data import resident

  margin = resident.margin_of(patch, crop)
  blocks, labels, offsets, padded, at = [], [], [], [], 0
  for c in cases:
    shape = tuple(max(s, p) + 2 * m for s, p, m in zip(c.pre.shape, patch, margin))
    scans = np.zeros((*shape, 2), np.float32)
    label = np.zeros(shape, np.uint8)
    inner = tuple(slice(m, m + s) for m, s in zip(margin, c.pre.shape))
    scans[(*inner, 0)], scans[(*inner, 1)], label[inner] = c.pre, c.post, c.label
    blocks.append(scans.reshape(-1, 2))
    labels.append(label.reshape(-1))
    offsets.append(at)
    padded.append(shape)
    at += label.size
  return (
    np.concatenate(blocks),
    np.concatenate(labels),
    np.array(offsets, np.int64),
    np.array(padded, np.int32),
    np.array([c.pre.shape for c in cases], np.int32),
  )


def flat_cut(flat, case, window, crop):
  """The crop at ``window`` of case ``case`` gathered from the flat buffer."""
  import jax.numpy as jnp

  scans, labels, offsets, padded, _ = flat
  d, h, w = (jnp.arange(n) for n in crop)
  _, ph, pw = padded[case, 0], padded[case, 1], padded[case, 2]
  index = (
    offsets[case]
    + ((window[0] + d)[:, None, None] * ph + (window[1] + h)[None, :, None]) * pw
    + (window[2] + w)[None, None, :]
  )
  return {"scans": jnp.take(scans, index, axis=0), "label": jnp.take(labels, index)}


def flat_rate(cases, patch, crop, batch: int, batches: int) -> dict:
  """Crops/s of uniform windows cut from the flat layout (the centre draw costs the same)."""
  import jax
  import jax.numpy as jnp

  flat_np = flat_pack(cases, patch, crop)
  flat = tuple(jnp.asarray(a) for a in flat_np)
  shapes = flat[4]

  @jax.jit
  def draw(step):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(0), step), batch)

    def row(key):
      k1, k2 = jax.random.split(key)
      case = jax.random.randint(k1, (), 0, shapes.shape[0])
      high = jnp.maximum(shapes[case] - jnp.asarray(patch), 0)
      window = (jax.random.uniform(k2, (3,)) * (high + 1)).astype(jnp.int32)
      return flat_cut(flat, case, window, crop)

    return jax.vmap(row)(keys)

  jax.block_until_ready(draw(0))
  timing = measure.time_calls(lambda: jax.block_until_ready(draw(1)), batches)
  total = sum(a.nbytes for a in flat_np[:2])
  return {"patches_per_s": batch / timing.median_s, "mb_per_case": total / len(cases) / 2**20}


def step_share(config, steps: int, case_shape, cases: int) -> dict:
  """The augmented training step drawing from the resident set vs given a device batch
  (the crops that set draws), and the sampler alone: its share of the step."""
  import jax
  import jax.numpy as jnp

  from resfuse_jax import train
  from resfuse_jax.data import resident
  from resfuse_jax.train import resident as device_resident

  task = measure.parts(config)
  batch = int(config.train.batch_size)
  model, tx = task.model, train.make_optimizer(config.train)
  init = jax.jit(lambda k: train.init_state(model, tx, task.patch_size, k))
  with tempfile.TemporaryDirectory() as tmp:
    loaded = workloads.memmapped_cases(Path(tmp), case_shape, cases)
    packed = resident.pack(loaded, task.regions, task.patch_size, task.crop_shape)
  arrays = device_resident.to_device(packed)
  sample = jax.jit(
    lambda step: device_resident.sample_crops(
      arrays, device_resident.sample_keys(0, step, batch), task.patch_size, task.crop_shape,
      1 / 3,
    )
  )  # fmt: skip
  fed = jax.jit(train.make_step_fn(config, model, tx, task.region_values), donate_argnums=0)
  drawing = jax.jit(
    train.make_step_fn(config, model, tx, task.region_values, resident_layout="replicated"),
    donate_argnums=0,
  )
  batch_ = jax.block_until_ready(sample(jnp.asarray(0)))
  out = {}
  for name, fn, given in (("fed", fed, batch_), ("resident", drawing, arrays)):
    state = init(jax.random.key(0))

    def one(fn=fn, given=given):
      nonlocal state
      state, metrics = fn(state, given)
      jax.block_until_ready(metrics)

    out[f"{name}_step_ms"] = 1e3 * measure.time_calls(one, steps, warmup=2).median_s
  out["sampler_ms"] = (
    1e3 * measure.time_calls(lambda: jax.block_until_ready(sample(jnp.asarray(1))), steps).median_s
  )
  out["sampler_share"] = out["sampler_ms"] / out["resident_step_ms"]
  out["step_difference_share"] = 1 - out["fed_step_ms"] / out["resident_step_ms"]
  out.update(
    patch=list(task.patch_size), batch=batch, features=list(config.model.features),
    crop=list(task.crop_shape), compute_dtype=config.train.compute_dtype,
  )  # fmt: skip
  return out


def run(size: dict) -> dict:
  import jax

  config = config_for(size["patch"], size["batch"])
  task = measure.parts(config)
  patch, crop = task.patch_size, task.crop_shape
  args = (config, size["case_shape"], size["cases"])
  out = {"backend": jax.default_backend(), "size": size, "patch": list(patch), "crop": list(crop)}
  out["host"] = workloads.data_path(*args, workers=0, threads=8, batches=size["batches"])
  for dtype in ("float32", "bfloat16"):
    out[f"resident_padded_{dtype}"] = workloads.resident_path(*args, size["batches"], dtype)
  with tempfile.TemporaryDirectory() as tmp:
    loaded = workloads.memmapped_cases(Path(tmp), size["case_shape"], size["cases"])
    out["resident_flat_float32"] = flat_rate(loaded, patch, crop, size["batch"], size["batches"])
  shapes = varied_shapes(size["case_shape"], 32)
  out["bytes_varied_shapes"] = layout_bytes(shapes, len(task.regions), patch, crop)
  step_config = config_for(size["step_patch"], size["batch"], size["step_features"])
  out["step"] = step_share(step_config, size["steps"], size["case_shape"], size["cases"])
  return out


def markdown(r: dict, command: str, commit: str) -> str:
  host = r["host"]["patches_per_s"]
  lines = [
    f"# Resident data against the host pipeline ({r['backend']})",
    "",
    f"`{command}` at {commit}, {time.strftime('%Y-%m-%d')}, {platform.node()}; "
    f"patch {r['patch']}, crop {r['crop']}, batch {r['size']['batch']}, "
    f"{r['size']['cases']} cases of {list(r['size']['case_shape'])}.",
    "",
    "| path | crops/s | × host | MB per case |",
    "|---|---:|---:|---:|",
    f"| host pipeline (Grain, in-process, 8 threads) | {host:.1f} | 1.0 | (memory-mapped) |",
  ]
  for key in ("resident_padded_float32", "resident_padded_bfloat16", "resident_flat_float32"):
    v = r[key]
    mb = v.get("resident_mb_per_case", v.get("mb_per_case"))
    lines.append(
      f"| {key.replace('_', ' ')} | {v['patches_per_s']:.1f} | "
      f"{v['patches_per_s'] / host:.1f} | {mb:.1f} |"
    )
  b = r["bytes_varied_shapes"]
  s = r["step"]
  lines += [
    "",
    "Bytes per case when shapes differ by ±15 % (32 cases, padded to the largest vs flat):",
    "",
    "| scans | padded MB | flat MB |",
    "|---|---:|---:|",
    *(
      f"| {k} | {v['padded_mb_per_case']:.1f} | {v['flat_mb_per_case']:.1f} |" for k, v in b.items()
    ),
    "",
    f"Sampler's share of the augmented step (patch {s['patch']}, crop {s['crop']}, "
    f"features {s['features']}): step given a device batch {s['fed_step_ms']:.1f} ms, "
    f"step drawing its own crops {s['resident_step_ms']:.1f} ms, sampler alone "
    f"{s['sampler_ms']:.2f} ms = **{100 * s['sampler_share']:.1f} %** of the step "
    f"(difference of the two steps: {100 * s['step_difference_share']:.1f} %).",
    "",
  ]
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
  parser.add_argument("--size", default="brats", choices=sorted(SIZES))
  args = parser.parse_args(argv)
  result = run(SIZES[args.size])
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=measure.ROOT, capture_output=True, text=True
  ).stdout.strip()
  command = f"python -m benchmarks.resident_data --out={args.out} --size={args.size}"
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(
    json.dumps({"command": command, "commit": commit, **result}, indent=1)
  )
  out.with_suffix(".md").write_text(markdown(result, command, commit))
  print(markdown(result, command, commit))


if __name__ == "__main__":
  main()
