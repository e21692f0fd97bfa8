"""Inference-only export of a trained workdir: ``python -m resfuse_jax.export``.

  python -m resfuse_jax.export --workdir=W --output=E [--step=N]
  python -m resfuse_jax.predict --model=E --pre=t1n.nii.gz --post=t1c.nii.gz --out=seg.nii.gz

``E/`` holds everything prediction needs and nothing of training:

- ``config.json``: the model and the preprocessing settings (spacing, normalisation,
  crop, regions, thresholds) the model was trained with;
- ``export.json``: step, source workdir, regions and label values, parameter count,
  library versions and the serving signature;
- ``params/``: the parameters as an Orbax checkpoint (no optimiser state);
- ``serving/window.jax_export``: a serialized ``jax.export`` of the window function
  ``tiles [n, d, h, w, 2] float32 (pre, post) -> region probabilities [n, d, h, w, R]``
  with the parameters embedded and a symbolic batch ``n``, lowered for CPU and CUDA, for
  serving without this package's model code (``jax.export.deserialize``).

The folder is written under a temporary name and renamed when complete, so a
killed export never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

from resfuse_jax import cli, data
from resfuse_jax.exported import FORMAT, SERVING_FILE
from resfuse_jax.predictor import Predictor, region_label_values

FLAGS = flags.FLAGS
PLATFORMS = ("cpu", "cuda")


def serving_function(predictor: Predictor) -> jax.export.Exported:
  """The window function with the parameters embedded, batch dimension symbolic."""
  (n,) = jax.export.symbolic_shape("n")
  patch = tuple(predictor.config.data.patch_size)
  params = predictor.params
  forward = jax.jit(lambda tiles: predictor.forward(params, tiles))
  return jax.export.export(forward, platforms=PLATFORMS)(
    jax.ShapeDtypeStruct((n, *patch, 2), jnp.float32)
  )


def export_model(workdir: str | Path, output: str | Path, step: int | None = None) -> Path:
  output = Path(output)
  if output.exists():
    raise data.DataError(f"--output={output} already exists; remove it or choose another path")
  predictor = Predictor(workdir, step)
  config = predictor.config
  tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.mkdir(parents=True)
  try:
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp / "params").absolute(), predictor.params)
    checkpointer.wait_until_finished()
    serving = serving_function(predictor)
    (tmp / SERVING_FILE).parent.mkdir()
    (tmp / SERVING_FILE).write_bytes(serving.serialize())
    meta = {
      "format": FORMAT,
      "step": int(predictor.step),
      "source_workdir": str(Path(workdir).absolute()),
      "model": config.model.name,
      "variant": config.model.get("variant", config.model.name),
      "dataset": config.data.name,
      "regions": list(predictor.info.regions),
      "label_values": region_label_values(predictor.info.regions),
      "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(predictor.params))),
      "serving": {
        "file": SERVING_FILE,
        "input": f"float32[n, {', '.join(map(str, config.data.patch_size))}, 2] (pre, post)",
        "output": f"float32[n, {', '.join(map(str, config.data.patch_size))}, "
        f"{len(predictor.info.regions)}] region probabilities",
        "platforms": list(PLATFORMS),
      },
      "versions": {"jax": jax.__version__, "flax": flax.__version__},
    }
    (tmp / "export.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output


def define_flags() -> None:
  """Called by `run`: importing this module for its functions defines no flags."""
  flags.DEFINE_string("workdir", None, "Training workdir to export.")
  flags.DEFINE_string("output", None, "Export folder to create (must not exist).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.output:
    raise app.UsageError("--workdir and --output are required")
  out = export_model(FLAGS.workdir, FLAGS.output, FLAGS.step)
  print(f"exported {FLAGS.workdir} to {out}")


def run():
  """Console-script entry point (``resfuse-export``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
