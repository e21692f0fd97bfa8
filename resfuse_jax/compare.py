"""Trains and compares models on one dataset: ``python -m resfuse_jax.compare``.

  python -m resfuse_jax.compare --config=configs/phantom.py \
      --models=resfuse,resunet,resunet_early,a2fnet,tsf_seq2seq,lits --workdir=runs/compare

Every model gets the config file's settings with only the model changed (the
same data, fold, budget, seed and command-line overrides) and trains into
``W/<model>/``; a model whose run already finished is not retrained, one that
was interrupted resumes. Writes ``W/comparison.json`` and ``W/comparison.md``:
per model the parameter count, training FLOPs per step (XLA cost analysis),
Dice and recall per region (mean ± std over validation cases), and a paired
Wilcoxon signed-rank test per region against ``resfuse`` across cases.
``--seeds=0,1,2`` trains each model once per seed and averages every case's
metrics over the seeds before the statistics (reporting the seed spread too).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from scipy import stats

from resfuse_jax import cli, data, metrics, train

FLAGS = flags.FLAGS
METRICS = ("dice", "recall")
PAPER_NAMES = {"ET": "EN"}


def load_config(
  path: str, arg: str | None, model: str, overrides: dict
) -> ml_collections.ConfigDict:
  """``path``'s ``get_config`` for ``model`` with the other args and overrides kept."""
  spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
  if spec is None or spec.loader is None:
    raise data.DataError(f"{path}: not a config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  parts = [p for p in (arg or "").split(",") if p]
  options = [p for p in parts if p not in module.common.MODELS]
  if model not in module.common.MODELS:
    raise app.UsageError(
      f"Unknown model {model!r} in --models; choose from {', '.join(module.common.MODELS)}"
    )
  return module.common.apply_overrides(module.get_config(",".join([model, *options])), overrides)


def run_model(config: ml_collections.ConfigDict, workdir: Path) -> tuple[dict, list[dict]]:
  """Trains (or resumes) one model unless its workdir already holds a finished run."""
  results_path, rows_path = workdir / "results.json", workdir / "metrics.csv"
  finished = False
  if results_path.exists() and rows_path.exists():
    done = json.loads(results_path.read_text())
    same_config = json.loads((workdir / "config.json").read_text()) == json.loads(
      json.dumps(config.to_dict())
    )
    finished = done.get("steps") == config.train.steps and same_config
  if finished:
    logging.info("%s: finished run found, not retrained", workdir)
  else:
    train.train_and_evaluate(config, str(workdir))
  return json.loads(results_path.read_text()), metrics.read_csv(rows_path)


def paired_test(ours: list[float], reference: list[float]) -> dict:
  """Wilcoxon signed-rank test of per-case differences; p = 1 when no case differs."""
  diff = np.asarray(ours) - np.asarray(reference)
  if not np.any(diff):
    p = 1.0
  else:
    p = float(stats.wilcoxon(diff, zero_method="wilcox").pvalue)
  return {"mean_diff": float(np.mean(diff)), "p_value": p, "test": "wilcoxon signed-rank"}


def summarize(
  name: str, results: dict, per_seed: list[list[dict]], regions: list[str], flops: float
) -> dict:
  """Per metric and region: mean ± std over cases of the seed-averaged per-case value."""
  entry = {"model": name, "params": results["params"], "train_flops_per_step": flops}
  for m in METRICS:
    # [seeds, cases] per region, plus the per-case mean over regions
    values = {
      r: np.array([[row[f"{m}_{r}"] for row in rows] for rows in per_seed]) for r in regions
    }
    values["mean"] = np.mean([values[r] for r in regions], axis=0)
    entry[m] = {
      r: {
        "mean": float(v.mean()),
        "std": float(np.std(v.mean(axis=0))),
        "seed_std": float(np.std(v.mean(axis=1))),
      }
      for r, v in values.items()
    }
  return entry


def seed_averaged(per_seed: list[list[dict]], key: str) -> list[float]:
  return list(np.mean([[row[key] for row in rows] for rows in per_seed], axis=0))


def compare(
  config_path: str,
  arg: str | None,
  names: list[str],
  workdir: Path,
  overrides: dict,
  reference: str,
  seeds: list[int] | None = None,
) -> dict:
  runs = {}
  for name in names:
    config = load_config(config_path, arg, name, overrides)
    per_seed = []
    for seed in seeds or [None]:
      run_config, run_dir = config, workdir / name
      if seed is not None:
        run_config = ml_collections.ConfigDict(config.to_dict())
        run_config.seed = seed
        run_dir = run_dir / f"seed{seed}"
      logging.info("=== %s%s ===", name, "" if seed is None else f", seed {seed}")
      results, rows = run_model(run_config, run_dir)
      per_seed.append({row["case"]: row for row in rows})
    runs[name] = (config, results, per_seed)
  first = next(iter(runs.values()))[0]
  regions = data.dataset_info(first.data.name).region_names
  cases = sorted(next(iter(runs.values()))[2][0])
  for name, (_, _, per_seed) in runs.items():
    if any(sorted(rows) != cases for rows in per_seed):
      raise data.DataError(f"{workdir / name} was validated on other cases than {names[0]}")
  ordered = {
    n: [[rows[c] for c in cases] for rows in per_seed] for n, (_, _, per_seed) in runs.items()
  }
  ref = reference if reference in runs else names[0]
  entries = []
  for name, (config, results, _) in runs.items():
    entry = summarize(name, results, ordered[name], regions, train.train_step_flops(config))
    entry["paired_vs_reference"] = {
      m: {
        r: paired_test(
          seed_averaged(ordered[name], f"{m}_{r}"), seed_averaged(ordered[ref], f"{m}_{r}")
        )
        for r in regions
      }
      for m in METRICS
    }
    entries.append(entry)
  out = {
    "dataset": first.data.name,
    "fold": first.data.fold,
    "seeds": list(seeds) if seeds else [first.seed],
    "steps": first.train.steps,
    "batch_size": first.train.batch_size,
    "patch_size": list(first.data.patch_size),
    "cases": len(cases),
    "regions": regions,
    "reference": ref,
    "models": entries,
  }
  _write_atomic(workdir / "comparison.json", json.dumps(out, indent=2))
  _write_atomic(workdir / "comparison.md", comparison_markdown(out))
  return out


def _write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def _pm(stat: dict) -> str:
  return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def _row(cells: list[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return [_row(header), "|---" * len(header) + "|", *map(_row, rows)]


def comparison_markdown(c: dict) -> str:
  """The paper's Table 1 (DSC, recall) / Table 2 (DSC per region + mean) layout, plus cost."""
  regions, ref, multi_seed = c["regions"], c["reference"], len(c["seeds"]) > 1
  cols = regions + ["mean"] if len(regions) > 1 else regions
  label = {r: PAPER_NAMES.get(r, r) for r in regions} | {"mean": "Mean"}
  lines = _table(
    ["Methodology", "Params", "GFLOP/step"]
    + [f"DSC {label[r]} (%)" for r in cols]
    + [f"Recall {label[r]} (%)" for r in cols],
    [
      [e["model"], f"{e['params']:,}", f"{e['train_flops_per_step'] / 1e9:.2f}"]
      + [_pm(e[m][r]) for m in METRICS for r in cols]
      for e in c["models"]
    ],
  )
  lines += [
    "",
    f"{c['dataset']}, fold {c['fold']}, {c['cases']} validation cases, {c['steps']} steps of "
    f"batch {c['batch_size']} at patch {'×'.join(map(str, c['patch_size']))}, "
    f"seed{'s' if multi_seed else ''} {', '.join(map(str, c['seeds']))}. "
    "Mean ± std over cases (population std"
    + ("; each case's metric averaged over the seeds first" if multi_seed else "")
    + "); GFLOP/step: one training step (forward, backward, update) by XLA's cost analysis.",
  ]
  if multi_seed:
    spread = "; ".join(
      f"{e['model']} " + ", ".join(f"{label[r]} {100 * e['dice'][r]['seed_std']:.2f}" for r in cols)
      for e in c["models"]
    )
    lines += ["", f"Spread over seeds (std of the case-mean DSC, points): {spread}."]
  lines += [
    "",
    f"Paired Wilcoxon signed-rank test against {ref} across cases: mean difference in points "
    "(p-value).",
    "",
  ]
  lines += _table(
    ["Methodology"]
    + [f"Δ{'DSC' if m == 'dice' else 'Recall'} {label[r]}" for m in METRICS for r in regions],
    [
      [e["model"]]
      + [
        f"{100 * t[m][r]['mean_diff']:+.2f} ({t[m][r]['p_value']:.3g})"
        for m in METRICS
        for r in regions
      ]
      for e in c["models"]
      if e["model"] != ref
      for t in [e["paired_vs_reference"]]
    ],
  )
  return "\n".join(lines) + "\n"


def define_flags() -> None:
  """Called by `run`: importing this module for its functions defines no flags."""
  config_flags.DEFINE_config_file(
    "config", None, "Dataset config file, e.g. configs/brats.py (its model arg is ignored)."
  )
  flags.DEFINE_list("models", None, "Models to compare, e.g. resfuse,resunet,a2fnet.")
  flags.DEFINE_string("workdir", None, "Folder for one workdir per model and the comparison.")
  flags.DEFINE_string("reference", "resfuse", "Model the paired tests compare against.")
  flags.DEFINE_list(
    "seeds",
    None,
    "Train every model once per seed (W/<model>/seed<k>/) and average each case's metrics "
    "over seeds; default: the config's seed, in W/<model>/.",
  )
  flags.mark_flags_as_required(["config", "models", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  path, _, arg = config_flags.get_config_filename(FLAGS["config"]).partition(":")
  overrides = config_flags.get_override_values(FLAGS["config"])
  workdir = Path(FLAGS.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
  except ValueError:
    raise app.UsageError(f"--seeds must be integers, e.g. 0,1,2; got {FLAGS.seeds}") from None
  compare(path, arg or None, FLAGS.models, workdir, overrides, FLAGS.reference, seeds)
  print((workdir / "comparison.md").read_text())


def run():
  """Console-script entry point (``resfuse-compare``)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
