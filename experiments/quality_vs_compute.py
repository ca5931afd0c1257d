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
  python -m experiments.quality_vs_compute --quick --workdir=/tmp/qvc   # CI size

Writes <workdir>/quality_vs_compute.{csv,png}, config.json and one training
workdir per mapping kind.
"""

import pathlib

from absl import app
from absl import flags
import ml_collections

from att3d_jax import train
from experiments import common

METRICS = common.METRICS


def run(config: ml_collections.ConfigDict, workdir: str, kinds=("hypernet", "per_prompt"),
        curve_every: int = 250) -> list[dict]:
  """Trains each mapping kind, returns the curve rows (also written as CSV + PNG)."""
  workdir = pathlib.Path(workdir)
  common.write_config(config, workdir)
  rows = []
  for kind in kinds:
    run_config = common.variant(config, {"mapping.kind": kind,
                                         "eval.curve_every": curve_every,
                                         "eval.write_outputs": False})
    run_dir = workdir / kind
    train.train_and_evaluate(run_config, str(run_dir))
    rows += common.curve_rows(run_dir, {"mapping": kind})
  common.write_csv(rows, workdir / "quality_vs_compute.csv")
  plot(rows, workdir / "quality_vs_compute.png")
  return rows


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
  rows = run(config, _WORKDIR.value, tuple(_KINDS.value),
             2 if _QUICK.value else _CURVE_EVERY.value)
  print(f"{'mapping':>10s} {'split':>7s} {'frames':>7s} " + " ".join(f"{m:>11s}" for m in METRICS))
  for row in rows:
    print(f"{row['mapping']:>10s} {row['split']:>7s} {row['frames_per_prompt']:7.0f} "
          + " ".join(f"{row[m]:11.3f}" for m in METRICS))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes.py", "base config")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/quality_vs_compute", "outputs")
  _KINDS = flags.DEFINE_list("kinds", ["hypernet", "per_prompt"], "mapping kinds to compare")
  _CURVE_EVERY = flags.DEFINE_integer("curve_every", 250, "steps between evaluations")
  _QUICK = flags.DEFINE_bool("quick", False, "CI size: the quick config, a few steps")
  app.run(main)
