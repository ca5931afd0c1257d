r"""Interpolation training: smooth paths between prompts without losing the endpoints.

ATT3D (Sec. 3.3) trains on mixtures of prompts so that the mapping network's
output moves smoothly along (1 - a) c_A + a c_B. Two amortized models are
trained on `shapes_pig64`: one without interpolation training
(interpolation.kind="none") and one with it (--interpolation=embedding: mixed
text embeddings and captions; or loss: mixed SDS losses). For a few prompt
pairs, each model renders the path at --num_weights weights a from one fixed
view, and is scored on

- smoothness_rms: the mean RMS RGB distance between neighbouring frames of the
  path (lower is smoother; a straight cross-fade has endpoint_rms / (N - 1));
- max_step_rms: the largest such step (a jump in the path);
- endpoint_rms: the RMS distance of the two endpoint frames;
- endpoint_iou / endpoint_psnr / endpoint_color_acc: GT quality of the two
  endpoints (a = 0 and a = 1) over the config's evaluation views: what
  interpolation training may cost the prompts themselves.

  python -m experiments.interpolation --workdir=runs/interpolation
  python -m experiments.interpolation --interpolation=loss --workdir=runs/interpolation_loss
  python -m experiments.interpolation --quick --workdir=/tmp/interpolation  # test size

Writes <workdir>/interpolation.csv (one row per model and pair),
interpolation.png (the metrics per pair and model), interpolation_strips.png
(rows: pair x model, columns: weights), config.json and one training workdir
per model (none/, embedding/ or loss/).

Cost of the full mode: two runs of configs/shapes.py (its train.num_steps, capped at
its train.time_budget_s of 25 min each; `loss` renders once but runs the UNet
on both prompts, so it is slower per step and stops at the cap) plus a final GT
evaluation of 64 prompts x 16 views and start-up each, then seconds for the
paths: about 1 h in all. Measured run times: docs/results/README.md ("Run costs").
"""

import pathlib
from typing import Sequence

from absl import app
from absl import flags
import ml_collections
import numpy as np

from att3d_jax import generate
from att3d_jax import prompt_data
from att3d_jax import xla_cpu
from att3d_jax.eval import shapes_eval
from experiments import common

PROMPT_SET = "shapes_pig64"
# Training prompts of shapes_pig64 (the held-out diagonal is color i with shape i).
PAIRS = (("a red cube", "a blue cube"),  # the color changes
         ("a green sphere", "a green torus"),  # the shape changes
         ("a yellow cone", "a purple capsule"))  # both change
VIEW_AZIMUTH_DEG = 30.0  # the path's fixed view, at generate.Generator's 20 deg elevation


def path_inputs(generator: generate.Generator, prompt_a: str, prompt_b: str,
                weights: np.ndarray) -> np.ndarray:
  """Mapping inputs of (1 - a) c_A + a c_B for each a in weights [N]: [N, D(+1)]."""
  embedding = generator.trained.guidance.embed([prompt_a, prompt_b])  # [2, D]
  mixed = (1.0 - weights)[:, None] * embedding[0] + weights[:, None] * embedding[1]
  return prompt_data.mapping_inputs(generator.trained.config, mixed)


def render_inputs(generator: generate.Generator, inputs: np.ndarray, cameras) -> dict:
  """rgb [N, V, H, W, 3] and opacity [N, V, H, W] of mapping inputs [N, D(+1)]."""
  outs = [generator.render(generator.mapping(row[None]), cameras) for row in inputs]
  return {name: np.stack([np.asarray(out[name]) for out in outs]) for name in ("rgb", "opacity")}


def path_smoothness(frames: np.ndarray) -> dict[str, float]:
  """RMS RGB distances along a path of frames [N, H, W, 3] (N >= 2)."""
  steps = np.sqrt(np.mean((frames[1:] - frames[:-1]) ** 2, axis=(1, 2, 3)))  # [N - 1]
  return {"smoothness_rms": float(np.mean(steps)), "max_step_rms": float(np.max(steps)),
          "endpoint_rms": float(np.sqrt(np.mean((frames[-1] - frames[0]) ** 2)))}


def endpoint_quality(generator: generate.Generator, prompts: Sequence[str],
                     inputs: np.ndarray) -> dict[str, float]:
  """Mean GT IoU, PSNR and color accuracy over the evaluation views of prompts
  [P], given their mapping inputs [P, D(+1)]."""
  config = generator.trained.config
  cameras = shapes_eval.eval_cameras(config.eval.elevations_deg,
                                     config.eval.views_per_elevation, config.eval.distance,
                                     config.eval.fov_y_deg)
  out = render_inputs(generator, inputs, cameras)
  scores = shapes_eval.summarize(shapes_eval.score_prompts(list(prompts), out["rgb"],
                                                           out["opacity"], cameras))
  return {f"endpoint_{name}": scores[name] for name in ("iou", "psnr", "color_acc")}


def run(config: ml_collections.ConfigDict, workdir: str, interpolation: str = "embedding",
        pairs: Sequence[tuple[str, str]] = PAIRS, num_weights: int = 9) -> list[dict]:
  """Trains the two models and scores their paths; returns the CSV rows.

  Args:
    config: a shapes config (configs/shapes.py); prompts.set becomes shapes_pig64
      and interpolation.kind is set per model.
    workdir: outputs; the two runs resume from their subfolders.
    interpolation: the interpolation-trained model's kind, "embedding" or "loss".
    pairs: (prompt A, prompt B) of the paths.
    num_weights: weights a, evenly spaced in [0, 1], per path (>= 2).
  """
  if interpolation not in ("embedding", "loss"):
    raise ValueError(f"--interpolation={interpolation!r}; expected 'embedding' or 'loss'")
  if num_weights < 2:
    raise ValueError(f"num_weights={num_weights}: a path needs at least its 2 endpoints")
  config = common.variant(config, {"prompts.set": PROMPT_SET, "eval.curve_every": 0,
                                   "eval.write_outputs": False})
  workdir = pathlib.Path(workdir)
  common.write_config(config, workdir)
  weights = np.linspace(0.0, 1.0, num_weights)
  rows, strips = [], []
  for kind in ("none", interpolation):
    run_dir = workdir / kind
    common.train_model(common.variant(config, {"interpolation.kind": kind}), run_dir)
    trained = generate.load_trained(str(run_dir))
    generator = generate.Generator(trained, image_size=config.camera.height)
    view = generator.cameras([VIEW_AZIMUTH_DEG])
    for prompt_a, prompt_b in pairs:
      inputs = path_inputs(generator, prompt_a, prompt_b, weights)
      frames = render_inputs(generator, inputs, view)["rgb"][:, 0]  # [N, H, W, 3]
      strips.append((f"{kind}:\n{prompt_a} ->\n{prompt_b}", frames))
      rows.append({"interpolation": kind, "prompt_a": prompt_a, "prompt_b": prompt_b,
                   "num_weights": num_weights, **path_smoothness(frames),
                   **endpoint_quality(generator, (prompt_a, prompt_b), inputs[[0, -1]])})
  common.write_csv(rows, workdir / "interpolation.csv")
  # Rows: each pair, the model without interpolation training above the one with it.
  strips = [strips[model * len(pairs) + pair] for pair in range(len(pairs)) for model in (0, 1)]
  common.save_image_rows(strips, [f"a={w:.2f}" for w in weights],
                         workdir / "interpolation_strips.png",
                         title="(1 - a) c_A + a c_B, fixed view")
  plot(rows, workdir / "interpolation.png")
  return rows


def plot(rows: Sequence[dict], path: pathlib.Path) -> None:
  plt = common.pyplot()
  metrics = {"smoothness_rms": "mean step (RMS RGB), lower = smoother",
             "max_step_rms": "largest step (RMS RGB)",
             "endpoint_iou": "endpoint silhouette IoU (GT)",
             "endpoint_color_acc": "endpoint color accuracy (GT)"}
  kinds = list(dict.fromkeys(r["interpolation"] for r in rows))
  pairs = list(dict.fromkeys((r["prompt_a"], r["prompt_b"]) for r in rows))
  figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.8))
  width = 0.8 / len(kinds)
  for axis, (metric, title) in zip(axes, metrics.items()):
    for offset, kind in enumerate(kinds):
      values = [next(r[metric] for r in rows if r["interpolation"] == kind
                     and (r["prompt_a"], r["prompt_b"]) == pair) for pair in pairs]
      axis.bar(np.arange(len(pairs)) + offset * width, values, width, label=kind)
    axis.set_xticks(np.arange(len(pairs)) + 0.4 - width / 2,
                    [f"{a}\n-> {b}" for a, b in pairs], fontsize=6)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3, axis="y")
  axes[0].legend(title="interpolation training", fontsize=7)
  common.save_figure(figure, path)


def main(argv):
  del argv
  config = _CONFIG.value
  if _QUICK.value:
    config = common.quick_config(config.guidance.path, common.TINY)
  xla_cpu.split_host(config.train.cpu_devices)  # as main.py: both cores train
  rows = run(config, _WORKDIR.value, _INTERPOLATION.value, num_weights=_NUM_WEIGHTS.value)
  names = ("smoothness_rms", "max_step_rms", "endpoint_iou", "endpoint_color_acc")
  print(f"{'model':>10s} {'pair':>40s} " + " ".join(f"{n:>18s}" for n in names))
  for row in rows:
    pair = f"{row['prompt_a']} -> {row['prompt_b']}"
    print(f"{row['interpolation']:>10s} {pair:>40s} "
          + " ".join(f"{row[n]:18.4f}" for n in names))


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes.py", "base config")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/interpolation", "outputs")
  _INTERPOLATION = flags.DEFINE_enum("interpolation", "embedding", ["embedding", "loss"],
                                     "the interpolation-trained model's kind")
  _NUM_WEIGHTS = flags.DEFINE_integer("num_weights", 9, "weights a per path")
  _QUICK = flags.DEFINE_bool("quick", False, "test size: the quick config, 4 steps, 2 views")
  app.run(main)
