r"""Judges the shapes-world diffusion model against ground truth.

DDIM samples with classifier-free guidance of every prompt of the 8x8 color x
shape set, captioned with each requested view ("a red cube, front view"), are
judged by `att3d_jax.eval.judge` (color by foreground votes, shape and view by
nearest GT silhouette + shading). The judge's own accuracy on fresh GT renders
from random shapes-world cameras is its ceiling; chance levels come along.

  python -m experiments.eval_shapes_diffusion --model_dir=weights/shapes \
      --out_dir=runs/eval_shapes_diffusion
  ... --quick   # 1 CFG weight, 2 views, 10 DDIM steps, small judge bank (CI)

Writes into --out_dir: scores.json (scores per CFG weight, overall and per
view, the ceiling, chance levels, timings and the settings), and per CFG
weight samples_cfg<w>.png: rows colors, columns shapes (order of
scenes.COLORS and scenes.SHAPES), one 8x8 block per view, left to right in
--views order; and judgements_cfg<w>.json: each caption's judged color, shape
and view.
"""

import json
import pathlib
import time
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from att3d_jax import xla_cpu
from att3d_jax.eval import judge as judge_lib
from att3d_jax.guidance import schedule
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.nerf import turntable
from att3d_jax.shapes import diffusion
from att3d_jax.shapes import scenes

_MODEL_DIR = flags.DEFINE_string("model_dir", "weights/shapes", "diffusers folder of the model")
_GUIDANCE_SCALES = flags.DEFINE_list("guidance_scales", ["1", "2", "3", "5"],
                                     "classifier-free guidance weights to try")
_VIEWS = flags.DEFINE_list("views", list(cameras_lib.VIEW_LABELS), "caption views")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 50, "DDIM steps")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/eval_shapes_diffusion", "where outputs go")
_SEED = flags.DEFINE_integer("seed", 0, "sampling noise and ceiling cameras derive from it")
_QUICK = flags.DEFINE_bool("quick", False, "CI size: the first CFG weight, the first 2 "
                           "views, 10 DDIM steps, a small judge bank and ceiling")

BATCH_SIZE = 64  # captions per sampler call: the whole 8x8 set of one view
CEILING_CAMERAS_PER_PROMPT = 16  # fresh GT renders per prompt for the ceiling
QUICK_VIEWS_PER_SHAPE = 256  # judge bank of --quick (the default is 1024)
QUICK_CEILING_CAMERAS_PER_PROMPT = 2
QUICK_NUM_STEPS = 10
GRID_GAP = 4  # white pixels between the per-view blocks of a sample grid

# Summary table columns: (title, score key).
SUMMARY_COLUMNS = (("color", "color_acc"), ("shape", "shape_acc"),
                   ("color+shape", "color_and_shape_acc"), ("view agree", "view_agreement"),
                   ("(chance)", "view_agreement_chance"), ("view exact", "view_exact"),
                   ("(chance)", "view_exact_chance"))


def make_sampler(model: diffusion.ShapesDiffusionModel, num_steps: int, image_size: int):
  """One jitted DDIM sampler for every batch and CFG weight:
  (key, conditioning [BATCH_SIZE, 1 + L, D], guidance_scale []) -> images
  [BATCH_SIZE, H, W, 3] in [0, 1]."""
  eps_fn = model.eps_fn()

  @jax.jit
  def sample(key, conditioning, guidance_scale):
    unconditional = jnp.zeros_like(conditioning[:1])  # what caption dropout trained on
    x0 = schedule.ddim_sample(eps_fn, key, (BATCH_SIZE, 3, image_size, image_size),
                              conditioning, unconditional, guidance_scale, num_steps,
                              model.alphas_cumprod)
    return jnp.clip((jnp.transpose(x0, (0, 2, 3, 1)) + 1.0) / 2.0, 0.0, 1.0)

  return sample


def sample_captions(sampler, conditioning: jax.Array, guidance_scale: float,
                    key: jax.Array) -> np.ndarray:
  """Samples of every caption's conditioning [N, 1 + L, D] -> [N, H, W, 3].

  Batch b draws its noise from fold_in(key, b) whatever the guidance scale,
  so the CFG weights are compared on the same noise. The last batch is padded
  by repeating its last caption (one compiled shape).
  """
  num = conditioning.shape[0]
  chunks = []
  for batch, start in enumerate(range(0, num, BATCH_SIZE)):
    part = conditioning[start:start + BATCH_SIZE]
    padding = BATCH_SIZE - part.shape[0]
    part = jnp.concatenate([part, jnp.repeat(part[-1:], padding, axis=0)])
    images = sampler(jax.random.fold_in(key, batch), part, jnp.float32(guidance_scale))
    chunks.append(np.asarray(images)[:BATCH_SIZE - padding])
  return np.concatenate(chunks)


def sample_grid(images: np.ndarray, num_views: int) -> np.ndarray:
  """Images of `judge.color_shape_captions` order [colors * shapes * views, H, W, 3]
  -> one uint8 picture: per view an 8x8 block (rows colors, columns shapes)."""
  num_colors, num_shapes = len(scenes.COLORS), len(scenes.SHAPES)
  per_view = images.reshape((num_colors * num_shapes, num_views) + images.shape[1:])
  blocks = [turntable.contact_sheet(per_view[:, view], columns=num_shapes)
            for view in range(num_views)]
  gap = np.full((blocks[0].shape[0], GRID_GAP, 3), 255, np.uint8)
  pieces = [piece for block in blocks for piece in (block, gap)][:-1]
  return np.concatenate(pieces, axis=1)


def scores_by_view(judgements: dict, captions: Sequence[str],
                   views: Sequence[str]) -> dict[str, dict[str, float]]:
  """`judge.score` over all captions and over each view's captions (view chance
  levels against the whole set's caption views)."""
  frequency = judge_lib.caption_view_frequency(captions)
  result = {"all": judge_lib.score(judgements, captions)}
  for view in views:
    keep = np.asarray([caption.endswith(cameras_lib.view_suffix(view)) for caption in captions])
    subset = {key: np.asarray(value)[keep] for key, value in judgements.items()}
    result[view] = judge_lib.score(subset, [c for c, k in zip(captions, keep) if k], frequency)
  return result


def print_summary(results: dict) -> None:
  """One row per CFG weight and one for the judge's ceiling on GT renders."""
  print(f"{'':>12}" + "".join(f"{title:>13}" for title, _ in SUMMARY_COLUMNS))
  rows = [("GT ceiling", results["ceiling"])] + [
      (f"CFG {scale}", entry["scores"]["all"])
      for scale, entry in results["by_guidance_scale"].items()]
  for name, scores in rows:
    print(f"{name:>12}" + "".join(f"{scores[key]:>13.3f}" for _, key in SUMMARY_COLUMNS))
  ceiling = results["ceiling"]
  print(f"chance: color {ceiling['color_chance']:.3f}, shape {ceiling['shape_chance']:.3f}, "
        f"color+shape {ceiling['color_and_shape_chance']:.3f} (balanced 8x8 set)")


def evaluate(model_dir: str, guidance_scales: Sequence[float], views: Sequence[str],
             num_steps: int, out_dir: str, seed: int,
             views_per_shape: int = judge_lib.DEFAULT_VIEWS_PER_SHAPE,
             ceiling_cameras_per_prompt: int = CEILING_CAMERAS_PER_PROMPT) -> dict:
  """Samples, judges and writes everything; returns what scores.json holds.

  The best CFG weight is the one with the highest color_and_shape_acc, ties
  broken by view_agreement. Random numbers: the samples' noise comes from
  fold_in(key(seed), 0), the ceiling's cameras from seed + 1.
  """
  for view in views:
    if view not in cameras_lib.VIEW_LABELS:
      raise ValueError(f"unknown view {view!r} in --views; expected some of "
                       f"{cameras_lib.VIEW_LABELS}")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  timings = {}
  evaluation_start = start = time.time()
  model = diffusion.ShapesDiffusionModel(model_dir)
  image_size = model.image_size
  captions = judge_lib.color_shape_captions(views)
  conditioning = model.conditioning(captions)
  timings["load_and_encode_s"] = time.time() - start

  start = time.time()
  judge = judge_lib.Judge(image_size, image_size, views_per_shape)
  timings["judge_bank_s"] = time.time() - start
  start = time.time()
  ceiling_images, ceiling_captions = judge_lib.ground_truth_renders(
      seed + 1, ceiling_cameras_per_prompt, image_size, image_size)
  ceiling = judge_lib.score(judge.judge(ceiling_images), ceiling_captions)
  timings["ceiling_s"] = time.time() - start

  sampler = make_sampler(model, num_steps, image_size)
  key = jax.random.fold_in(jax.random.key(seed), 0)
  by_scale = {}
  for guidance_scale in guidance_scales:
    start = time.time()
    images = sample_captions(sampler, conditioning, guidance_scale, key)
    sample_seconds = time.time() - start
    judgements = judge.judge(images)
    grid_path = out / f"samples_cfg{guidance_scale:g}.png"
    turntable.save_png(sample_grid(images, len(views)), grid_path)
    judged_path = out / f"judgements_cfg{guidance_scale:g}.json"
    judged_path.write_text(json.dumps([
        {"caption": caption, "color": str(color), "shape": str(shape), "view": str(view)}
        for caption, color, shape, view in zip(captions, judgements["color"],
                                               judgements["shape"], judgements["view"])]))
    by_scale[f"{guidance_scale:g}"] = {
        "scores": scores_by_view(judgements, captions, views),
        "grid": grid_path.name,
        "judgements": judged_path.name,
        "sampling_s": sample_seconds,
        "judging_s": time.time() - start - sample_seconds,
    }
  best = max(by_scale, key=lambda scale: (by_scale[scale]["scores"]["all"]["color_and_shape_acc"],
                                          by_scale[scale]["scores"]["all"]["view_agreement"]))
  timings["total_s"] = time.time() - evaluation_start
  results = {
      "model_dir": str(pathlib.Path(model_dir).resolve()),
      "settings": {"guidance_scales": list(guidance_scales), "views": list(views),
                   "num_steps": num_steps, "seed": seed, "batch_size": BATCH_SIZE,
                   "views_per_shape": views_per_shape,
                   "ceiling_cameras_per_prompt": ceiling_cameras_per_prompt,
                   "foreground_threshold": judge_lib.FOREGROUND_THRESHOLD,
                   "view_tolerance": judge_lib.VIEW_TOLERANCE},
      "ceiling": ceiling,
      "by_guidance_scale": by_scale,
      "best_guidance_scale": best,
      "timings": timings,
  }
  (out / "scores.json").write_text(json.dumps(results, indent=2))
  return results


def main(argv):
  del argv
  xla_cpu.use_eigen_convolutions()  # before the first computation
  scales = [float(scale) for scale in _GUIDANCE_SCALES.value]
  views, num_steps = _VIEWS.value, _NUM_STEPS.value
  views_per_shape, ceiling_cameras = judge_lib.DEFAULT_VIEWS_PER_SHAPE, CEILING_CAMERAS_PER_PROMPT
  if _QUICK.value:
    scales, views, num_steps = scales[:1], views[:2], QUICK_NUM_STEPS
    views_per_shape, ceiling_cameras = QUICK_VIEWS_PER_SHAPE, QUICK_CEILING_CAMERAS_PER_PROMPT
  results = evaluate(_MODEL_DIR.value, scales, views, num_steps, _OUT_DIR.value, _SEED.value,
                     views_per_shape, ceiling_cameras)
  print_summary(results)
  print(f"best CFG weight: {results['best_guidance_scale']}; took "
        f"{results['timings']['total_s']:.0f} s; wrote {_OUT_DIR.value}/scores.json")


if __name__ == "__main__":
  app.run(main)
