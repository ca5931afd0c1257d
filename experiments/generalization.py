r"""Generalization to unseen prompts against the number of training prompts.

The shapes analog of ATT3D's Animal2400 study (unseen-prompt quality as the
training set grows): one amortized model per nested train split of
`shapes_2400` (12.5% = 250, 50% = 1000, 100% = 2000 prompts), each scored
against ground truth on the same 400 held-out prompts (and up to
eval.max_train_prompts seen ones) every `--curve_every` steps. Compute is the
total number of rendered frames, step * B * V: equal for every split at equal
steps, whereas frames per *training* prompt shrink as the set grows.

  python -m experiments.generalization --workdir=runs/generalization \
      --kinds=hypernet,triplane --num_steps=1600 --curve_every=200 --baseline_prompts=16
  python -m experiments.generalization --quick --workdir=/tmp/generalization  # test size

Two readings of "as the set grows": at equal total compute (every run's
last point: the same steps, so fewer frames per training prompt for larger
splits) and at equal frames per training prompt (the 100% run's last point
against the 12.5% run at 1/8 and the 50% run at 1/2 of its steps: hence
curve_every = num_steps / 8). With --baseline_prompts, a fixed sample of
held-out prompts is also optimized one grid per prompt (mapping.kind
per_prompt) with the frames each of the set's 2400 prompts would get from
the amortized runs' total compute, and on to the 12.5% split's frames per
training prompt: ATT3D's "12.5% beats per-prompt optimization of every
prompt" reads off the plot's dotted level.

Writes <workdir>/generalization.{csv,png}, config.json and one training
workdir per generator and split (hypernet_12.5pct, ..., per_prompt). The plot:
held-out metrics (factor metrics, R-precision, IoU) against the number of
training prompts, one color per generator. Measured run costs and results:
docs/results/README.md. --quick: 3 steps per run, curve_every=2, 2 views.
"""

import pathlib
from typing import Sequence

from absl import app
from absl import flags
import ml_collections

from att3d_jax import evaluation
from att3d_jax import prompt_data
from att3d_jax import xla_cpu
from att3d_jax.shapes import prompt_sets
from experiments import common

PROMPT_SET = "shapes_2400"
SPLITS = ("12.5%", "50%", "100%")
SET_SIZE = prompt_sets.SHAPES_2400_SIZE  # per-prompt optimization of the whole set
SMALLEST_SPLIT_PROMPTS = 250  # 12.5% of the 2000-prompt pool


def run(config: ml_collections.ConfigDict, workdir: str, splits: Sequence[str] = SPLITS,
        curve_every: int = 500, num_steps: int = 1500, budget_min: float = 30.0,
        eval_views: int = 4, kinds: Sequence[str] = ("hypernet",),
        baseline_prompts: int = 0) -> list[dict]:
  """Trains one model per generator and train split of shapes_2400; returns the curve rows.

  Args:
    config: a shapes config (configs/shapes.py); prompts.set and the fields
      below are overridden.
    workdir: outputs; the runs resume from their subfolders.
    splits: train splits of shapes_2400 (12.5%, 50%, 100%).
    curve_every: steps between GT evaluations; num_steps / 8 puts a point at
      equal frames per training prompt for every split (see equal_frames_rows).
    num_steps: training steps per run.
    budget_min: minutes of training (evaluations included) per run; 0 = none.
    eval_views: evaluation views, split over config.eval.elevations_deg.
    kinds: generators (mapping.kind) to train, e.g. hypernet, triplane.
    baseline_prompts: > 0: also optimize this many held-out prompts (a fixed
      sample) per prompt (`per_prompt_baseline`).

  Returns:
    rows of generalization.csv: generator, train_split, num_train_prompts,
    split (train | heldout prompts), step, frames_per_prompt,
    rendered_frames, *METRICS.
  """
  elevations = len(config.eval.elevations_deg)
  if eval_views % elevations:
    raise ValueError(f"eval_views={eval_views} must be a multiple of the "
                     f"{elevations} eval.elevations_deg {tuple(config.eval.elevations_deg)}")
  config = common.variant(config, {
      "prompts.set": PROMPT_SET, "train.num_steps": num_steps,
      "train.time_budget_s": 60.0 * budget_min, "eval.curve_every": curve_every,
      "eval.views_per_elevation": eval_views // elevations, "eval.write_outputs": False})
  workdir = pathlib.Path(workdir)
  common.write_config(config, workdir)
  frames_per_step = config.batch.prompts_per_step * config.batch.views_per_prompt
  rows = []
  for kind in kinds:
    for split in splits:
      run_config = common.variant(config, {"prompts.split": split, "mapping.kind": kind})
      run_dir = workdir / f"{kind}_{split.rstrip('%')}pct"
      final = common.train_model(run_config, run_dir)
      labels = {"generator": kind, "train_split": split,
                "num_train_prompts": final["num_train_prompts"]}
      points = common.curve_rows(run_dir, labels)
      if final["steps"] not in {point["step"] for point in points}:
        # The time budget stopped training between two curve points: the final
        # evaluation is the last point.
        points += common.evaluation_rows(final["steps"], final, labels)
      # equal_total_compute marks the per-prompt baseline's point (below).
      rows += [{**point, "rendered_frames": point["step"] * frames_per_step,
                "equal_total_compute": False} for point in points]
  if baseline_prompts:
    rows += per_prompt_baseline(config, workdir, baseline_prompts,
                                total_frames=num_steps * frames_per_step)
  common.write_csv(rows, workdir / "generalization.csv")
  plot(rows, workdir / "generalization.png")
  return rows


def per_prompt_baseline(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        num_prompts: int, total_frames: int) -> list[dict]:
  """Per-prompt optimization (mapping.kind=per_prompt) of a fixed sample of
  held-out prompts, every prompt every step, one view each.

  ATT3D's claim reads off its curve: at equal *total* compute, optimizing each
  of the set's prompts gets total_frames / (all prompts of the set) frames per
  prompt; the curve runs on to the frames per training prompt of the smallest
  split, and its points are labeled train_split "per_prompt", split "heldout"
  (the prompts are held-out prompts, each optimized for itself).
  """
  heldout = prompt_data.load_prompts(config).heldout
  rows = evaluation.eval_rows(len(heldout), num_prompts)
  prompts_file = workdir / "per_prompt_prompts.txt"
  prompts_file.parent.mkdir(parents=True, exist_ok=True)
  prompts_file.write_text("".join(heldout[i] + "\n" for i in rows))
  equal_total = max(1, total_frames // SET_SIZE)  # frames (= steps) per prompt
  num_steps = max(equal_total, total_frames // SMALLEST_SPLIT_PROMPTS)
  run_config = common.variant(config, {
      "prompts.file": str(prompts_file), "mapping.kind": "per_prompt",
      "batch.prompts_per_step": len(rows), "batch.views_per_prompt": 1,
      "batch.without_replacement": True, "train.num_steps": num_steps,
      "eval.curve_every": equal_total, "eval.max_train_prompts": 0})
  final = common.train_model(run_config, workdir / "per_prompt")
  labels = {"generator": "per_prompt", "train_split": "per_prompt",
            "num_train_prompts": len(rows)}
  points = common.curve_rows(workdir / "per_prompt", labels)
  if final["steps"] not in {point["step"] for point in points}:
    points += common.evaluation_rows(final["steps"], final, labels)
  return [{**point, "split": "heldout", "rendered_frames": point["step"] * len(rows),
           "equal_total_compute": point["step"] == equal_total} for point in points]


def equal_compute_rows(rows: Sequence[dict], generator: str = "hypernet") -> list[dict]:
  """`generator`'s held-out rows at the largest step that every split's curve
  reached (equal total compute)."""
  heldout = [r for r in rows if r["split"] == "heldout"
             and r.get("generator", "hypernet") == generator]
  splits = {r["train_split"] for r in heldout}
  step = min(max(r["step"] for r in heldout if r["train_split"] == s) for s in splits)
  return sorted((r for r in heldout if r["step"] == step),
                key=lambda r: r["num_train_prompts"])


def equal_frames_rows(rows: Sequence[dict], generator: str = "hypernet") -> list[dict]:
  """`generator`'s held-out rows at equal frames per *training* prompt: the
  largest split's final point and, for each smaller split, its curve point
  with the nearest frames_per_prompt at or below it."""
  heldout = [r for r in rows if r["split"] == "heldout"
             and r.get("generator", "hypernet") == generator]
  largest = max(r["num_train_prompts"] for r in heldout)
  target = max(r["frames_per_prompt"] for r in heldout if r["num_train_prompts"] == largest)
  chosen = []
  for count in sorted({r["num_train_prompts"] for r in heldout}):
    below = [r for r in heldout if r["num_train_prompts"] == count
             and r["frames_per_prompt"] <= target + 1e-9]
    if below:
      chosen.append(max(below, key=lambda r: r["frames_per_prompt"]))
  return chosen


PLOT_METRICS = ("iou", "r_precision", "factor_color", "factor_shape", "factor_size",
                "factor_hat", "factor_hat_color")


def plot(rows: Sequence[dict], path: pathlib.Path) -> None:
  """Held-out metrics against training prompts, one color per generator: at
  equal total compute (solid) and equal frames per training prompt (dashed);
  per-prompt optimization at equal total compute as a dotted level."""
  plt = common.pyplot()
  figure, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(3.2 * len(PLOT_METRICS), 3.6))
  generators = sorted({r.get("generator", "hypernet") for r in rows} - {"per_prompt"})
  baseline = [r for r in rows if r.get("equal_total_compute")]
  for axis, metric in zip(axes, PLOT_METRICS):
    for color, generator in enumerate(generators):
      for select, line, name in ((equal_compute_rows, "-", "equal compute"),
                                 (equal_frames_rows, "--", "equal frames/prompt")):
        points = [r for r in select(rows, generator) if r[metric] is not None]
        axis.plot([p["num_train_prompts"] for p in points], [p[metric] for p in points],
                  color=f"C{color}", linestyle=line, marker="o", markersize=3,
                  label=f"{generator}, {name}")
    for r in baseline:
      if r[metric] is not None:
        axis.axhline(r[metric], color="gray", linestyle=":", label="per-prompt, equal total")
    axis.set_xscale("log")
    axis.minorticks_off()
    counts = sorted({r["num_train_prompts"] for r in rows if r["train_split"] != "per_prompt"})
    axis.set_xticks(counts, [str(c) for c in counts])
    axis.set_xlabel("training prompts")
    axis.set_title(common.METRIC_TITLES.get(metric, metric), fontsize=9)
    axis.grid(alpha=0.3)
  axes[0].legend(fontsize=6)
  common.save_figure(figure, path)


def main(argv):
  del argv
  config = _CONFIG.value
  if _QUICK.value:
    config = common.quick_config(config.guidance.path,
                                 {**common.TINY, "eval.max_heldout_prompts": 32})
  xla_cpu.split_host(config.train.cpu_devices)  # as main.py: both cores train
  if _QUICK.value:
    rows = run(config, _WORKDIR.value, _SPLITS.value, curve_every=2, num_steps=3,
               budget_min=0.0, eval_views=2, kinds=_KINDS.value, baseline_prompts=2)
  else:
    rows = run(config, _WORKDIR.value, _SPLITS.value, _CURVE_EVERY.value,
               _NUM_STEPS.value, _BUDGET_MIN.value, _EVAL_VIEWS.value, _KINDS.value,
               _BASELINE_PROMPTS.value)
  print(f"{'generator':>10s} {'train':>10s} {'prompts':>8s} {'split':>7s} {'step':>5s} "
        + " ".join(f"{m[-11:]:>11s}" for m in common.METRICS))
  for row in rows:
    print(f"{row['generator']:>10s} {row['train_split']:>10s} {row['num_train_prompts']:8d} "
          f"{row['split']:>7s} {row['step']:5d} "
          + " ".join("        n/a" if row[m] is None else f"{row[m]:11.3f}"
                     for m in common.METRICS))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes.py", "base config")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/generalization", "outputs")
  _SPLITS = flags.DEFINE_list("splits", list(SPLITS), "train splits of shapes_2400")
  _CURVE_EVERY = flags.DEFINE_integer("curve_every", 500, "steps between evaluations")
  _NUM_STEPS = flags.DEFINE_integer("num_steps", 1500, "training steps per split")
  _BUDGET_MIN = flags.DEFINE_float("budget_min", 30.0, "training minutes per split "
                                   "(evaluations included); 0 = no limit")
  _EVAL_VIEWS = flags.DEFINE_integer("eval_views", 4, "evaluation views per prompt")
  _KINDS = flags.DEFINE_list("kinds", ["hypernet", "triplane"], "generators (mapping.kind)")
  _BASELINE_PROMPTS = flags.DEFINE_integer(
      "baseline_prompts", 16, "held-out prompts optimized per prompt at equal total "
      "compute (0 = no baseline)")
  _QUICK = flags.DEFINE_bool("quick", False, "test size: the quick config, 3 steps, 2 views")
  app.run(main)
