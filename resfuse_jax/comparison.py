"""Trains and compares models on one dataset (``python -m resfuse_jax.compare``).

Every model gets the config file's settings with only the model changed (the
same data, fold, budget, seed and command-line overrides) and trains into
``W/<model>/``; a model whose run already finished is not retrained, one that
was interrupted resumes. Only training's own files are read
(``W/<model>/results.json`` and ``metrics.csv``, never an ``evaluate`` folder).
Writes ``W/comparison.json`` and ``W/comparison.md``: per model the parameter
count, training FLOPs per step (XLA cost analysis), Dice and recall per region
(mean ± std over validation cases), and a paired Wilcoxon signed-rank test per
region against ``resfuse`` across cases. ``seeds=[0, 1, 2]`` trains each model
once per seed and averages every case's metrics over the seeds before the
statistics (reporting the seed spread too).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging
from scipy import stats

from resfuse_jax import config_lib, data, files, train
from resfuse_jax.errors import ConfigError, DataError
from resfuse_jax.evaluation import metrics
from resfuse_jax.evaluation.report import markdown_table, paper_name

METRICS = ("dice", "recall")


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
  rows = metrics.read_csv(rows_path)
  after_path = workdir / "metrics_postprocessed.csv"
  if after_path.exists():  # the same cases after the post-processing chosen on them
    after = {row["case"]: row for row in metrics.read_csv(after_path)}
    rows = [
      row | {f"pp_{k}": v for k, v in after[row["case"]].items() if k != "case"} for row in rows
    ]
  return json.loads(results_path.read_text()), rows


def paired_test(ours: list[float], reference: list[float]) -> dict:
  """Wilcoxon signed-rank test of per-case differences; p = 1 when no case differs."""
  diff = np.asarray(ours) - np.asarray(reference)
  if not np.any(diff):
    p = 1.0
  else:
    p = float(stats.wilcoxon(diff, zero_method="wilcox").pvalue)
  return {"mean_diff": float(np.mean(diff)), "p_value": p, "test": "wilcoxon signed-rank"}


EXTRA_METRICS = ("lesion_dice", "pp_dice", "pp_lesion_dice")  # when every run has them


def summarize(
  name: str, results: dict, per_seed: list[list[dict]], regions: list[str], flops: float
) -> dict:
  """Per metric and region: mean ± std over cases of the seed-averaged per-case value."""
  entry = {"model": name, "params": results["params"], "train_flops_per_step": flops}
  present = [
    m for m in EXTRA_METRICS if all(f"{m}_{regions[0]}" in row for rows in per_seed for row in rows)
  ]
  for m in (*METRICS, *present):
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
        "seed_means": [float(x) for x in v.mean(axis=1)],
      }
      for r, v in values.items()
    }
  return entry


def seed_averaged(per_seed: list[list[dict]], key: str) -> list[float]:
  return list(np.mean([[row[key] for row in rows] for rows in per_seed], axis=0))


def compare(
  config_spec: str,
  names: list[str],
  workdir: str | Path,
  overrides: dict | None = None,
  reference: str = "resfuse",
  seeds: list[int] | None = None,
) -> dict:
  """Trains (or reuses) every model of ``names`` for ``config_spec`` ('configs/x.py[:args]')."""
  workdir = Path(workdir)
  configs = {n: config_lib.load(config_lib.with_model(config_spec, n), overrides) for n in names}
  with files.exclusive_lock(workdir, "comparison"):
    return _compare(configs, names, workdir, reference, seeds)


def _compare(configs: dict, names: list[str], workdir: Path, reference: str, seeds) -> dict:
  runs = {}
  for name, config in configs.items():
    per_seed, per_seed_results = [], []
    for seed in seeds or [None]:
      run_config, run_dir = config, workdir / name
      if seed is not None:
        run_config = ml_collections.ConfigDict(config.to_dict())
        run_config.seed = seed
        run_dir = run_dir / f"seed{seed}"
      logging.info("=== %s%s ===", name, "" if seed is None else f", seed {seed}")
      results, rows = run_model(run_config, run_dir)
      per_seed.append({row["case"]: row for row in rows})
      per_seed_results.append(results)
    runs[name] = (config, per_seed_results, per_seed)
  first = next(iter(runs.values()))[0]
  regions = data.get_dataset(first.data.name).region_names
  cases = sorted(next(iter(runs.values()))[2][0])
  for name, (_, _, per_seed) in runs.items():
    if any(sorted(rows) != cases for rows in per_seed):
      raise DataError(f"{workdir / name} was validated on other cases than {names[0]}")
  ordered = {
    n: [[rows[c] for c in cases] for rows in per_seed] for n, (_, _, per_seed) in runs.items()
  }
  ref = reference if reference in runs else names[0]
  entries = []
  for name, (config, per_seed_results, _) in runs.items():
    entry = summarize(
      name, per_seed_results[-1], ordered[name], regions, train.train_step_flops(config)
    )
    norms = [r.get("fusion_weight_norms") for r in per_seed_results]
    if all(norms):  # ResFuse's learned W_l: mean and spread over seeds, per level
      entry["fusion_weight_norms"] = {
        level: {
          "mean": float(np.mean([n[level] for n in norms])),
          "seed_std": float(np.std([n[level] for n in norms])),
        }
        for level in norms[0]
      }
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
  files.write_text(workdir / "comparison.json", json.dumps(out, indent=2))
  files.write_text(workdir / "comparison.md", comparison_markdown(out))
  return out


def _pm(stat: dict) -> str:
  return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def comparison_markdown(c: dict) -> str:
  """The paper's Table 1 (DSC, recall) / Table 2 (DSC per region + mean) layout, plus cost."""
  regions, ref, multi_seed = c["regions"], c["reference"], len(c["seeds"]) > 1
  cols = regions + ["mean"] if len(regions) > 1 else regions
  label = {r: paper_name(r) for r in regions} | {"mean": "Mean"}
  lines = markdown_table(
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
  lesion = [m for m in ("lesion_dice", "pp_lesion_dice") if all(m in e for e in c["models"])]
  if lesion:
    title = {"lesion_dice": "lesion-wise DSC", "pp_lesion_dice": "post-processed lesion-wise DSC"}
    lines += [""] + markdown_table(
      ["Methodology"] + [f"{title[m]} {label[r]} (%)" for m in lesion for r in cols],
      [[e["model"]] + [_pm(e[m][r]) for m in lesion for r in cols] for e in c["models"]],
    )
    lines += [
      "",
      "BraTS 2023 lesion-wise Dice (each spurious component counts as a missed lesion); "
      "post-processed: after the rules each model's own validation chose "
      "(`W/<model>/postprocessing.json`).",
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
  lines += markdown_table(
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


# ----- Sweeps: the same comparison at every value of one config field ---------------------

SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.png")


def parse_sweep(text: str, config: ml_collections.ConfigDict) -> tuple[str, list]:
  """'data.misregistration_mm=0,1.5,3' -> ('data.misregistration_mm', [0.0, 1.5, 3.0]).

  Values take the type of that field in ``config`` (which must have it).
  """
  key, sep, values = text.partition("=")
  example = "e.g. --sweep=data.misregistration_mm=0,1.5,3"
  if not sep or not key or not values:
    raise ConfigError(f"--sweep={text}: expected <config field>=<v1>,<v2>,...; {example}")
  node = config
  *parents, leaf = key.split(".")
  try:
    for p in parents:
      node = node[p]
    current = node[leaf]
  except (KeyError, AttributeError, TypeError):
    raise ConfigError(f"--sweep={text}: the config has no field {key}; {example}") from None
  if isinstance(current, bool) or not isinstance(current, int | float | str):
    raise ConfigError(f"--sweep={text}: {key} is {current!r}; only numbers and strings sweep")
  try:
    parsed = [type(current)(v.strip()) for v in values.split(",")]
  except ValueError:
    raise ConfigError(
      f"--sweep={text}: every value must be a {type(current).__name__} like {key}={current!r}"
    ) from None
  if len(set(parsed)) != len(parsed):
    raise ConfigError(f"--sweep={text}: a value is repeated")
  return key, parsed


def sweep_folder(key: str, value, default) -> str:
  """``W/<key>=<value>``; the config's own value runs in ``W/default``, shared by every sweep."""
  if value == default:
    return "default"
  return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def sweep(
  config_spec: str,
  names: list[str],
  workdir: str | Path,
  sweep_text: str,
  overrides: dict | None = None,
  reference: str = "resfuse",
  seeds: list[int] | None = None,
) -> dict:
  """One ``compare`` per value (finished runs reused); ``W/sweep.{json,md,png}`` across them."""
  workdir = Path(workdir)
  overrides = dict(overrides or {})
  config = config_lib.load(config_spec, overrides)
  key, values = parse_sweep(sweep_text, config)
  if key in overrides:
    raise ConfigError(f"--sweep={sweep_text} and --config.{key}: sweep the field or set it")
  default = eval_key(config, key)
  points = []
  for value in values:
    folder = sweep_folder(key, value, default)
    logging.info("##### %s = %s (%s) #####", key, value, workdir / folder)
    out = compare(config_spec, names, workdir / folder, overrides | {key: value}, reference, seeds)
    points.append({"value": value, "folder": folder, "comparison": out})
  result = sweep_record(key, values, points)
  with files.exclusive_lock(workdir, "sweep"):
    files.write_json(workdir / "sweep.json", result)
    files.write_text(workdir / "sweep.md", sweep_markdown(result))
    from resfuse_jax import visualize  # matplotlib only for the figure

    visualize.sweep_figure(workdir / "sweep.png", result)
  return result


def eval_key(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def sweep_record(key: str, values: list, points: list[dict]) -> dict:
  """Per model and value: Dice per region (case mean, seed means), paired test, W_l norms."""
  first = points[0]["comparison"]
  regions = first["regions"]
  cols = regions + ["mean"] if len(regions) > 1 else regions
  models = {}
  for point in points:
    for entry in point["comparison"]["models"]:
      m = models.setdefault(entry["model"], {"dice": {r: [] for r in cols}, "paired": {}})
      for r in cols:
        stat = entry["dice"][r]
        m["dice"][r].append(
          {"mean": stat["mean"], "seed_std": stat["seed_std"], "seed_means": stat["seed_means"]}
        )
      for r in regions:
        m["paired"].setdefault(r, []).append(entry["paired_vs_reference"]["dice"][r])
      if "fusion_weight_norms" in entry:
        norms = m.setdefault("fusion_weight_norms", {})
        for level, stat in entry["fusion_weight_norms"].items():
          norms.setdefault(level, []).append(stat)
  return {
    "knob": key,
    "values": values,
    "folders": [p["folder"] for p in points],
    "dataset": first["dataset"],
    "seeds": first["seeds"],
    "steps": first["steps"],
    "cases": first["cases"],
    "regions": regions,
    "reference": first["reference"],
    "models": models,
  }


def sweep_markdown(s: dict) -> str:
  """Dice per region against the knob, the paired tests, and W_l's norms."""
  regions, values, ref = s["regions"], s["values"], s["reference"]
  cols = regions + ["mean"] if len(regions) > 1 else regions
  label = {r: paper_name(r) for r in regions} | {"mean": "Mean"}
  head = [f"{s['knob']} = {v:g}" if isinstance(v, float) else f"{s['knob']} = {v}" for v in values]
  lines = [
    f"# Sweep of {s['knob']}",
    "",
    f"{s['dataset']}, {s['cases']} validation cases, {s['steps']} steps, seeds "
    f"{', '.join(map(str, s['seeds']))}. DSC (%): mean over cases of each case's DSC averaged "
    "over the seeds ± the std over seeds of the case-mean DSC. * marks a paired Wilcoxon "
    f"signed-rank test against {ref} across cases with p < 0.05.",
  ]
  for r in cols:
    rows = []
    for name, m in s["models"].items():
      cells = []
      for i, stat in enumerate(m["dice"][r]):
        star = ""
        if r != "mean" and name != ref and m["paired"][r][i]["p_value"] < 0.05:
          star = "*"
        cells.append(f"{100 * stat['mean']:.2f} ± {100 * stat['seed_std']:.2f}{star}")
      rows.append([name, *cells])
    lines += ["", f"## DSC {label[r]}", ""] + markdown_table(["Model", *head], rows)
  lines += ["", f"## Paired test against {ref}: mean DSC difference in points (p)", ""]
  lines += markdown_table(
    ["Model", "Region", *head],
    [
      [name, label[r]]
      + [f"{100 * t['mean_diff']:+.2f} ({t['p_value']:.3g})" for t in m["paired"][r]]
      for name, m in s["models"].items()
      if name != ref
      for r in regions
    ],
  )
  learned = {
    n: m["fusion_weight_norms"] for n, m in s["models"].items() if "fusion_weight_norms" in m
  }
  if learned:
    lines += [
      "",
      "## Learned fusion weights: Frobenius norm of W_l per encoder level (mean ± std over seeds)",
      "",
    ]
    lines += markdown_table(
      ["Model", "Level", *head],
      [
        [name, level] + [f"{x['mean']:.3f} ± {x['seed_std']:.3f}" for x in stats]
        for name, norms in learned.items()
        for level, stats in norms.items()
      ],
    )
  return "\n".join(lines) + "\n"
