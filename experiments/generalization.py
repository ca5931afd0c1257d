r"""Generalization to unseen prompts against the number of training prompts.

The shapes analog of ATT3D's Animal2400 study (unseen-prompt quality as the
training set grows): one amortized model per nested train split of
`shapes_2400` (12.5% = 250, 50% = 1000, 100% = 2000 prompts), each scored
against ground truth on the same 400 held-out prompts (and up to
eval.max_train_prompts seen ones) every `--curve_every` steps. Compute is the
total number of rendered frames, step * B * V: equal for every split at equal
steps, whereas frames per *training* prompt shrink as the set grows.

  python -m experiments.generalization --workdir=runs/generalization
  python -m experiments.generalization --quick --workdir=/tmp/generalization  # test size

Writes <workdir>/generalization.{csv,png}, config.json and one training
workdir per split (train_12.5pct, ...). The plot: held-out (solid) and seen
(dashed) GT metrics against rendered frames, one color per split, and
held-out metrics against the number of training prompts at the largest step
every split reached (equal compute).

Cost of the full mode (estimated from the measurements below, for an idle
2-core CPU at about 1 step/s with the shapes config's 8 prompts x 2 views):
per split, 1500 steps (~25 min; --budget_min=30 caps training plus its curve
evaluations), 5 GT evaluations (steps 0, 500, 1000, 1500 and the final one,
~1.3 min each) and ~1 min of start-up (text tables of up to 2400 prompts):
about 33 min, so about 1 h 40 min for the three splits, never much above
3 x 32 min. Every evaluation renders 464 prompts (400 held-out + 64 seen) at
--eval_views=4 views (the shapes config's 16 would quadruple it). Measured on
the shared 2-core CPU (load ~5, about 0.6 core for this job): an evaluation
of 464 prompts x 2 views x 24 samples took 75 s (47 s of it GT renders), the
text tables of 650 prompts 46 s; an idle machine is estimated 2-3x faster.
--quick: 3 steps per split, curve_every=2, 2 views, 32 of the held-out prompts
(eval.max_heldout_prompts); 3 evaluations of 96 prompts per split. Measured run
times: docs/results/README.md ("Run costs").
"""

import pathlib
from typing import Sequence

from absl import app
from absl import flags
import ml_collections

from att3d_jax import xla_cpu
from experiments import common

PROMPT_SET = "shapes_2400"
SPLITS = ("12.5%", "50%", "100%")


def run(config: ml_collections.ConfigDict, workdir: str, splits: Sequence[str] = SPLITS,
        curve_every: int = 500, num_steps: int = 1500, budget_min: float = 30.0,
        eval_views: int = 4) -> list[dict]:
  """Trains one model per train split of shapes_2400; returns the curve rows.

  Args:
    config: a shapes config (configs/shapes.py); prompts.set and the fields
      below are overridden.
    workdir: outputs; the split's runs resume from their subfolders.
    splits: train splits of shapes_2400 (12.5%, 50%, 100%).
    curve_every: steps between GT evaluations.
    num_steps: training steps per split.
    budget_min: minutes of training (evaluations included) per split; 0 = none.
    eval_views: evaluation views, split over config.eval.elevations_deg.

  Returns:
    rows of generalization.csv: train_split, num_train_prompts, split (train |
    heldout prompts), step, frames_per_prompt, rendered_frames, *METRICS.
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
  for split in splits:
    run_config = common.variant(config, {"prompts.split": split})
    run_dir = workdir / f"train_{split.rstrip('%')}pct"
    final = common.train_model(run_config, run_dir)
    labels = {"train_split": split, "num_train_prompts": final["num_train_prompts"]}
    points = common.curve_rows(run_dir, labels)
    if final["steps"] not in {point["step"] for point in points}:
      # The time budget stopped training between two curve points: the final
      # evaluation is the last point.
      points += common.evaluation_rows(final["steps"], final, labels)
    rows += [{**point, "rendered_frames": point["step"] * frames_per_step} for point in points]
  common.write_csv(rows, workdir / "generalization.csv")
  plot(rows, workdir / "generalization.png")
  return rows


def equal_compute_rows(rows: Sequence[dict]) -> list[dict]:
  """Held-out rows at the largest step that every split's curve reached."""
  heldout = [r for r in rows if r["split"] == "heldout"]
  splits = {r["train_split"] for r in heldout}
  step = min(max(r["step"] for r in heldout if r["train_split"] == s) for s in splits)
  return sorted((r for r in heldout if r["step"] == step),
                key=lambda r: r["num_train_prompts"])


def plot(rows: Sequence[dict], path: pathlib.Path) -> None:
  plt = common.pyplot()
  metrics = ("iou", "color_acc", "r_precision")
  figure, axes = plt.subplots(1, len(metrics) + 1, figsize=(16, 3.8))
  splits = sorted({(r["num_train_prompts"], r["train_split"]) for r in rows})
  for axis, metric in zip(axes, metrics):
    for color, (count, split) in enumerate(splits):
      for prompts, line, name in (("heldout", "-", "unseen"), ("train", "--", "seen")):
        points = [r for r in rows if r["train_split"] == split and r["split"] == prompts]
        axis.plot([p["rendered_frames"] for p in points], [p[metric] for p in points],
                  color=f"C{color}", linestyle=line, marker="o", markersize=3,
                  label=f"{count} prompts, {name}")
    axis.set_xlabel("rendered frames (step x B x V)")
    axis.set_title(common.METRIC_TITLES[metric])
    axis.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  final = equal_compute_rows(rows)
  for metric in metrics:
    axes[-1].plot([r["num_train_prompts"] for r in final], [r[metric] for r in final],
                  marker="o", label=common.METRIC_TITLES[metric])
  axes[-1].set_xscale("log")
  axes[-1].minorticks_off()
  axes[-1].set_xticks([r["num_train_prompts"] for r in final],
                      [str(r["num_train_prompts"]) for r in final])
  axes[-1].set_xlabel("training prompts")
  axes[-1].set_title(f"unseen prompts at step {final[0]['step']}")
  axes[-1].grid(alpha=0.3)
  axes[-1].legend(fontsize=7)
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
               budget_min=0.0, eval_views=2)
  else:
    rows = run(config, _WORKDIR.value, _SPLITS.value, _CURVE_EVERY.value,
               _NUM_STEPS.value, _BUDGET_MIN.value, _EVAL_VIEWS.value)
  print(f"{'train':>6s} {'prompts':>8s} {'split':>7s} {'step':>5s} "
        + " ".join(f"{m:>11s}" for m in common.METRICS))
  for row in rows:
    print(f"{row['train_split']:>6s} {row['num_train_prompts']:8d} {row['split']:>7s} "
          f"{row['step']:5d} " + " ".join(f"{row[m]:11.3f}" for m in common.METRICS))


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
  _QUICK = flags.DEFINE_bool("quick", False, "test size: the quick config, 3 steps, 2 views")
  app.run(main)
