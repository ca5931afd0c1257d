r"""Amortized vs per-prompt optimization: quality against rendered frames per prompt.

The shapes analog of ATT3D's main plot (quality vs compute on DF27 / Pig64):
the same config is trained twice, with the hypernetwork (amortized) and with
one free grid per prompt (`per_prompt`, the per-prompt optimization baseline:
same NeRF, renderer, SDS and step, same rows per step), and both are
evaluated against ground truth every `--curve_every` steps. Compute is
ATT3D's: rendered frames per training prompt, so the two runs are compared at
equal cost. Held-out prompts exist only for the amortized model (a per-prompt
grid cannot be made for an unseen prompt without optimizing it).

  python -m experiments.quality_vs_compute --config=configs/shapes.py \
      --workdir=runs/quality_vs_compute
  python -m experiments.quality_vs_compute --quick --workdir=/tmp/qvc   # test size

Writes <workdir>/quality_vs_compute.{csv,png,md}, config.json and one training
workdir per mapping kind.
"""

import pathlib

from absl import app
from absl import flags
import ml_collections

from att3d_jax import xla_cpu
from experiments import common


def run(config: ml_collections.ConfigDict, workdir: str, kinds=("hypernet", "per_prompt"),
        curve_every: int = 250, per_prompt_factor: int = 4) -> list[dict]:
  """Trains each mapping kind, returns the curve rows (also written as CSV, PNG and
  a Markdown table at equal budgets).

  The per-prompt baseline trains `per_prompt_factor` times the config's steps
  (its annealing schedule stretched to match), so the table can show whether
  the amortized model matches it at 1 / per_prompt_factor of its frames (the
  paper's claim). Budgets are exact: the runs ignore train.time_budget_s.
  """
  workdir = pathlib.Path(workdir)
  common.write_config(config, workdir)
  rows = []
  for kind in kinds:
    factor = per_prompt_factor if kind == "per_prompt" else 1
    run_config = common.variant(config, {"mapping.kind": kind,
                                         "train.num_steps": config.train.num_steps * factor,
                                         "train.time_budget_s": 0.0,
                                         "eval.curve_every": curve_every,
                                         "eval.write_outputs": False})
    run_dir = workdir / kind
    common.train_model(run_config, run_dir)
    rows += common.curve_rows(run_dir, {"mapping": kind})
  common.write_csv(rows, workdir / "quality_vs_compute.csv")
  plot(rows, workdir / "quality_vs_compute.png")
  (workdir / "quality_vs_compute.md").write_text(table(rows))
  return rows


def table(rows: list[dict]) -> str:
  """Markdown: IoU and R-precision of every kind and split at each evaluated
  budget (frames per prompt), then the frames each needs to reach the per-prompt
  baseline's final and best seen IoU."""
  columns = sorted({(r["mapping"], r["split"]) for r in rows},
                   key=lambda c: (c[0] != "hypernet", c[0], c[1] != "train"))
  at = {(r["mapping"], r["split"], round(r["frames_per_prompt"], 1)): r for r in rows}
  budgets = sorted({round(r["frames_per_prompt"], 1) for r in rows})
  names = [f"{kind} {'seen' if split == 'train' else 'unseen'}" for kind, split in columns]
  lines = ["| frames per prompt | " + " | ".join(f"{n} IoU" for n in names) + " | "
           + " | ".join(f"{n} R-prec." for n in names) + " |",
           "|---" * (1 + 2 * len(columns)) + "|"]
  for frames in budgets:
    cells = [at.get((*column, frames)) for column in columns]
    lines.append(f"| {frames:.0f} | " + " | ".join(
        "-" if c is None else f"{c['iou']:.3f}" for c in cells) + " | " + " | ".join(
        "-" if c is None else f"{c['r_precision']:.2f}" for c in cells) + " |")
  curves = {column: sorted((r for r in rows if (r["mapping"], r["split"]) == column),
                          key=lambda r: r["step"]) for column in columns}
  baseline = curves.get(("per_prompt", "train"))
  if baseline:
    # The paper's claim, read off the curves: the frames each model needs to
    # reach the per-prompt baseline's final and its best quality.
    for label, point in (("final", baseline[-1]), ("best", max(baseline, key=lambda r: r["iou"]))):
      lines += ["", f"Frames per prompt to reach the per-prompt baseline's {label} seen IoU "
                f"({point['iou']:.3f}, at {point['frames_per_prompt']:.0f} frames; linearly "
                "interpolated between evaluations):", ""]
      for column, name in zip(columns, names):
        frames = common.frames_to_reach(
            [(r["frames_per_prompt"], r["iou"]) for r in curves[column]], point["iou"])
        share = (f" ({frames / point['frames_per_prompt']:.0%} of the baseline's)"
                 if frames is not None and point["frames_per_prompt"] > 0 else "")
        lines.append(f"- {name}: " + ("not reached" if frames is None else f"{frames:.0f}{share}"))
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
  plt = common.pyplot()
  figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  styles = {("hypernet", "train"): ("C0", "-", "amortized, seen"),
            ("hypernet", "heldout"): ("C0", "--", "amortized, unseen"),
            ("concat", "train"): ("C2", "-", "concat, seen"),
            ("concat", "heldout"): ("C2", "--", "concat, unseen"),
            ("per_prompt", "train"): ("C3", "-", "per-prompt")}
  for axis, metric in zip(axes, ("iou", "color_acc", "r_precision")):
    for (kind, split), (color, line, label) in styles.items():
      points = [r for r in rows if r["mapping"] == kind and r["split"] == split]
      if points:
        axis.plot([p["frames_per_prompt"] for p in points], [p[metric] for p in points],
                  color=color, linestyle=line, marker="o", markersize=3, label=label)
    axis.set_xlabel("rendered frames per prompt")
    axis.set_title(common.METRIC_TITLES[metric])
    axis.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  common.save_figure(figure, path)


def main(argv):
  del argv
  config = _CONFIG.value
  if _QUICK.value:
    config = common.quick_config(_CONFIG.value.guidance.path)
  xla_cpu.split_host(config.train.cpu_devices)  # as main.py: both cores train
  rows = run(config, _WORKDIR.value, tuple(_KINDS.value),
             2 if _QUICK.value else _CURVE_EVERY.value, _PER_PROMPT_FACTOR.value)
  print(table(rows))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes.py", "base config")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/quality_vs_compute", "outputs")
  _KINDS = flags.DEFINE_list("kinds", ["hypernet", "per_prompt"], "mapping kinds to compare")
  _CURVE_EVERY = flags.DEFINE_integer("curve_every", 250, "steps between evaluations")
  _PER_PROMPT_FACTOR = flags.DEFINE_integer(
      "per_prompt_factor", 4, "the per-prompt baseline trains this many times the steps")
  _QUICK = flags.DEFINE_bool("quick", False, "test size: the quick config, a few steps")
  app.run(main)
