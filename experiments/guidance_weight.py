r"""One model amortized over the classifier-free guidance weight, read at several weights.

ATT3D (Sec. 3.4) feeds the CFG weight to the mapping network next to the
text embedding and samples it per row during training, so one model holds
the whole range of looks that separate per-weight runs would give. Here one
amortized model is trained on `shapes_pig64` with guidance.amortize_scale=True
(weights uniform in guidance.scale_range); then, with the weight fed to the
mapping network set to each of --weights in turn, its training and held-out
prompts are scored against ground truth over the evaluation views (the
training run's own evaluation, evaluation.evaluate) and a few are rendered.

  python -m experiments.guidance_weight --workdir=runs/guidance_weight
  python -m experiments.guidance_weight --quick --workdir=/tmp/guidance_weight  # test size

Writes <workdir>/guidance_weight.csv (one row per weight and split),
guidance_weight.png (GT metrics against the weight), guidance_weight_strip.png
(rows: two seen and two unseen prompts, columns: weights), config.json and
the training workdir model/.

Cost of the full mode: one run of configs/shapes.py (its train.num_steps, capped at its
train.time_budget_s of 25 min) with its final evaluation, then one GT
evaluation of 64 prompts x 16 views per weight (~1-2 min each): about 35 min
for 3 weights. Measured run times: docs/results/README.md ("Run costs").
"""

import pathlib
from typing import Sequence

from absl import app
from absl import flags
import ml_collections
import numpy as np

from att3d_jax import evaluation
from att3d_jax import generate
from att3d_jax import prompt_data
from att3d_jax import xla_cpu
from att3d_jax.nerf import cameras as cameras_lib
from experiments import common

PROMPT_SET = "shapes_pig64"
WEIGHTS = (2.0, 5.0, 10.0)
STRIP_PROMPTS_PER_SPLIT = 2
STRIP_VIEW = (20.0, 30.0)  # elevation, azimuth in degrees


def run(config: ml_collections.ConfigDict, workdir: str,
        weights: Sequence[float] = WEIGHTS) -> list[dict]:
  """Trains the CFG-amortized model and scores it at each weight; returns the CSV rows.

  Args:
    config: a shapes config (configs/shapes.py); prompts.set becomes
      shapes_pig64 and guidance.amortize_scale True.
    workdir: outputs; the run resumes from workdir/model.
    weights: CFG weights fed to the mapping network, inside guidance.scale_range.
  """
  low, high = config.guidance.scale_range
  outside = [w for w in weights if not low <= w <= high]
  if outside:
    raise ValueError(f"weights {outside} lie outside guidance.scale_range={(low, high)}, "
                     "which the model was amortized over; pick --weights inside it or "
                     "widen --config.guidance.scale_range")
  if config.mapping.kind == "per_prompt":
    raise ValueError("mapping.kind='per_prompt' ignores the mapping input, CFG weight "
                     "included; use hypernet or concat")
  config = common.variant(config, {"prompts.set": PROMPT_SET, "guidance.amortize_scale": True,
                                   "eval.curve_every": 0, "eval.write_outputs": False})
  workdir = pathlib.Path(workdir)
  common.write_config(config, workdir)
  run_dir = workdir / "model"
  results = common.train_model(config, run_dir)
  trained = generate.load_trained(str(run_dir))
  prompt_set = prompt_data.load_prompts(trained.config)
  train_tables = prompt_data.prompt_tables(trained.guidance, prompt_set.train)
  heldout_tables = prompt_data.prompt_tables(trained.guidance, prompt_set.heldout)
  rows = []
  for weight in weights:
    scores = evaluation.evaluate(
        common.variant(trained.config, {"guidance.scale": float(weight)}), trained.model,
        trained.guidance, trained.params, trained.stats, train_tables, heldout_tables,
        results["frames_per_prompt"])
    for split in ("train", "heldout"):
      rows.append({"weight": float(weight), "split": split, "steps": results["steps"],
                   "frames_per_prompt": results["frames_per_prompt"],
                   **{name: scores[split][name] for name in common.METRICS}})
  common.write_csv(rows, workdir / "guidance_weight.csv")
  plot(rows, workdir / "guidance_weight.png")
  save_strip(trained, train_tables, heldout_tables, weights,
             workdir / "guidance_weight_strip.png")
  return rows


def save_strip(trained: generate.TrainedModel, train_tables: prompt_data.PromptTables,
               heldout_tables: prompt_data.PromptTables, weights: Sequence[float],
               path: pathlib.Path) -> None:
  """Renders of a few seen and unseen prompts from one view, one column per weight."""
  config = trained.config
  count = STRIP_PROMPTS_PER_SPLIT
  prompts = train_tables.prompts[:count] + heldout_tables.prompts[:count]
  embedding = np.concatenate([train_tables.embedding[:count],
                              heldout_tables.embedding[:count]])  # [P, D]
  labels = [f"seen: {p}" for p in prompts[:count]] + [f"unseen: {p}" for p in prompts[count:]]
  elevation, azimuth = np.deg2rad(STRIP_VIEW)
  camera = cameras_lib.orbit_cameras(np.array([elevation]), np.array([azimuth]),
                                     config.eval.distance, np.deg2rad(config.eval.fov_y_deg))
  render = evaluation.make_render_prompts(trained.model, trained.guidance.background_color,
                                          config.camera.height, config.camera.width)
  index = np.zeros((len(prompts),), np.int32)  # the mapping network ignores it
  columns = [render(trained.params, trained.stats,
                    prompt_data.mapping_inputs(config, embedding,
                                               np.full((len(prompts),), weight, np.float32)),
                    index, camera)["rgb"][:, 0] for weight in weights]  # each [P, H, W, 3]
  frames = np.stack(columns, axis=1)  # [P, num_weights, H, W, 3]
  common.save_image_rows(list(zip(labels, frames)), [f"w={w:g}" for w in weights], path,
                         title="CFG weight fed to the mapping network")


def plot(rows: Sequence[dict], path: pathlib.Path) -> None:
  plt = common.pyplot()
  figure, axes = plt.subplots(1, len(common.METRICS), figsize=(4 * len(common.METRICS), 3.6))
  for axis, metric in zip(axes, common.METRICS):
    for split, line, label in (("train", "-", "seen prompts"), ("heldout", "--", "unseen")):
      points = [r for r in rows if r["split"] == split]
      axis.plot([p["weight"] for p in points], [p[metric] for p in points], color="C0",
                linestyle=line, marker="o", markersize=4, label=label)
    axis.set_xlabel("CFG weight fed to the mapping network")
    axis.set_title(common.METRIC_TITLES[metric])
    axis.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  common.save_figure(figure, path)


def main(argv):
  del argv
  config = _CONFIG.value
  if _QUICK.value:
    config = common.quick_config(config.guidance.path, common.TINY)
  xla_cpu.split_host(config.train.cpu_devices)  # as main.py: both cores train
  rows = run(config, _WORKDIR.value, [float(w) for w in _WEIGHTS.value])
  print(f"{'weight':>6s} {'split':>7s} " + " ".join(f"{m:>11s}" for m in common.METRICS))
  for row in rows:
    print(f"{row['weight']:6.1f} {row['split']:>7s} "
          + " ".join(f"{row[m]:11.3f}" for m in common.METRICS))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes.py", "base config")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/guidance_weight", "outputs")
  _WEIGHTS = flags.DEFINE_list("weights", [f"{w:g}" for w in WEIGHTS],
                               "CFG weights fed to the mapping network")
  _QUICK = flags.DEFINE_bool("quick", False, "test size: the quick config, 4 steps, 2 views")
  app.run(main)
