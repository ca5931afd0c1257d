r"""Per-prompt SDS with the shapes diffusion model: one hash-grid NeRF per prompt.

Each prompt gets its own grid tables and MLP (no hypernetwork); all prompts are
optimized side by side in one jitted step, vmapped over prompts, so their
optimizations stay independent. Every step renders `views_per_step` random
views per prompt, captions each with its view ("a red cube, side view"), and
follows the SDS gradient of the frozen model with classifier-free guidance.
t_max anneals from 0.98 to config.t_max_final and the learning rates decay,
so late steps only refine (long constant-t, constant-rate runs drift: colors
over-saturate and IoU falls); an opacity penalty keeps SDS from growing
background-colored density around the object.

Quality is measured against ground truth (silhouette IoU over 16 views, color),
and the density-bias blob alone (step 0) is reported as the floor.

  python -m experiments.sds_single --config=configs/sds_single.py --workdir=runs/sds_single
"""

import functools
import json
import pathlib
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import tqdm

from att3d_jax import names
from att3d_jax.eval import metrics
from att3d_jax.guidance import sds
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.nerf import model
from att3d_jax.nerf import render as render_lib
from att3d_jax.nerf import turntable
from att3d_jax.shapes import diffusion
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes


def nearest_color(rendered_rgb, opacity, truth_rgb_by_color, truth_mask) -> list[str]:
  """Names the color whose GT renders (same shape, same views) have the mean
  foreground color closest to the NeRF's: robust to the baked shading.

  Args:
    rendered_rgb: [V, H, W, 3]; opacity: [V, H, W].
    truth_rgb_by_color: [num_colors, V, H, W, 3]; truth_mask: [V, H, W].
  """
  foreground = np.asarray(opacity) > 0.5
  if not foreground.any():
    return "none"
  mean_rendered = np.asarray(rendered_rgb)[foreground].mean(axis=0)
  mask = np.asarray(truth_mask) > 0.5
  means = np.stack([np.asarray(rgb)[mask].mean(axis=0) for rgb in truth_rgb_by_color])
  return list(scenes.COLORS)[int(np.argmin(np.linalg.norm(means - mean_rendered, axis=-1)))]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  prompts = list(config.prompts)
  num_prompts, num_views = len(prompts), config.views_per_step
  height, width = config.camera.height, config.camera.width
  root_key = jax.random.key(config.seed)

  guide = diffusion.ShapesDiffusionModel(config.model_dir)
  eps_fn = guide.eps_fn()
  captions = [p + cameras_lib.view_suffix(v) for p in prompts for v in cameras_lib.VIEW_LABELS]
  conditioning_table = guide.conditioning(captions).reshape(
      num_prompts, len(cameras_lib.VIEW_LABELS), -1, guide.encoder.width)
  uncond = jnp.zeros_like(conditioning_table[0, :1])

  spec = model.grid_spec(config)
  mlp = model.field_mlp(config)

  params = jax.vmap(lambda key: model.init_params(key, spec, mlp))(
      jax.random.split(jax.random.fold_in(root_key, 0), num_prompts))

  def adam(learning_rate):  # cosine decay to lr_final_fraction of the rate
    return optax.adam(optax.cosine_decay_schedule(learning_rate, config.num_steps,
                                                  config.lr_final_fraction),
                      b2=config.adam_b2, eps=1e-15)

  optimizer = optax.multi_transform(
      {"tables": adam(config.learning_rate_tables), "mlp": adam(config.learning_rate_mlp)},
      {"tables": "tables", "mlp": jax.tree.map(lambda _: "mlp", params["mlp"])})
  opt_state = optimizer.init(params)

  def render_prompt(params_one, cameras, key):
    rays = cameras_lib.generate_rays(cameras, height, width)
    flat = cameras_lib.Rays(rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3))
    out = model.render_fn(params_one, spec, mlp, config, key,
                          background_color=scenes.BACKGROUND_RGB)(flat)
    return (out["rgb"].reshape(num_views, height, width, 3),
            out["opacity"].reshape(num_views, height, width))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, step):
    key = jax.random.fold_in(jax.random.fold_in(root_key, 1), step)
    camera_key, render_key, sds_key = jax.random.split(key, 3)
    cameras = jax.vmap(lambda k: cameras_lib.sample_cameras(
        k, num_views, config.camera.elevation_range_deg, config.camera.azimuth_range_deg,
        config.camera.distance_range, config.camera.fov_y_range_deg))(
            jax.random.split(camera_key, num_prompts))
    view = cameras_lib.view_index(cameras.elevation, cameras.azimuth)  # [P, V]
    conditioning = jnp.take_along_axis(
        conditioning_table, view[:, :, None, None], axis=1)  # [P, V, 1 + L, D]
    t_range = sds.annealed_t_range(config.t_range, config.t_max_final,
                                   step / config.num_steps)

    def loss_fn(params):
      images, opacity = jax.vmap(render_prompt)(params, cameras,
                                                jax.random.split(render_key, num_prompts))
      x = sds.pixel_model_input(images.reshape(-1, height, width, 3))
      # Summed over prompts: each prompt's gradient only reaches its own NeRF.
      loss, aux = sds.sds_loss(eps_fn, x, sds_key,
                               conditioning.reshape((-1,) + conditioning.shape[2:]), uncond,
                               alphas_cumprod=guide.alphas_cumprod,
                               guidance_scale=config.guidance_scale, t_range=t_range,
                               weighting=config.weighting)
      # Sparsity: a push of opacity_penalty per pixel against density the images
      # do not need (background-colored halos cost SDS nothing).
      return loss + config.opacity_penalty * jnp.sum(opacity), aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {
        "grad_norm": jnp.mean(aux["grad_norm"]), "guidance_rms": jnp.mean(aux["guidance_rms"])}

  eval_cameras = cameras_lib.ring_cameras(config.eval_elevations_deg,
                                          config.eval_views_per_elevation,
                                          config.eval_distance, config.eval_fov_y_deg)
  truth = [gt_render.render_views(scenes.encode_scene(scenes.parse_prompt(p)), eval_cameras,
                                  height, width) for p in prompts]
  # GT renders of every color of each prompt's shape, for naming the NeRF's color.
  truth_by_color = [np.stack([np.asarray(gt_render.render_views(
      scenes.encode_scene(scenes.Scene(color, scenes.parse_prompt(p).shape)), eval_cameras,
      height, width)["rgb"]) for color in scenes.COLORS]) for p in prompts]

  def render_all(params, cameras):
    """Every prompt's NeRF from `cameras`: outputs [P, num_views, H, W, ...]."""
    return jax.vmap(lambda p: render_lib.render_images(
        model.render_fn(p, spec, mlp, config, background_color=scenes.BACKGROUND_RGB),
        cameras, height, width))(params)

  render_eval = jax.jit(functools.partial(render_all, cameras=eval_cameras))

  def evaluate(params) -> list[dict]:
    rendered = render_eval(params)
    rows = []
    for i, prompt in enumerate(prompts):
      iou = np.asarray(metrics.silhouette_iou(rendered["opacity"][i], truth[i]["mask"]))
      color = nearest_color(rendered["rgb"][i], rendered["opacity"][i], truth_by_color[i],
                            truth[i]["mask"])
      area_ratio = metrics.silhouette_area_ratio(rendered["opacity"][i], truth[i]["mask"])
      rows.append({"prompt": prompt, "iou": float(iou.mean()), "iou_min_view": float(iou.min()),
                   "area_ratio": float(area_ratio),
                   "color": color, "color_ok": color == scenes.parse_prompt(prompt).color})
    return rows

  blob = evaluate(params)
  curve = [{"step": 0, "mean_iou": float(np.mean([r["iou"] for r in blob]))}]
  start = time.time()
  for step in tqdm.tqdm(range(config.num_steps), desc="sds_single"):
    params, opt_state, stats = train_step(params, opt_state, step)
    if (step + 1) % config.eval_every == 0 or step + 1 == config.num_steps:
      rows = evaluate(params)
      curve.append({"step": step + 1, "seconds": time.time() - start,
                    "mean_iou": float(np.mean([r["iou"] for r in rows])),
                    "iou": [round(r["iou"], 4) for r in rows],  # per prompt
                    "area_ratio": [round(r["area_ratio"], 3) for r in rows],
                    **{k: float(v) for k, v in stats.items()}})
      tqdm.tqdm.write(json.dumps(curve[-1]))
  seconds = time.time() - start

  final = evaluate(params)
  frames = jax.jit(render_all)(params, cameras_lib.turntable_cameras(
      config.turntable_frames, 20.0, config.eval_distance, config.eval_fov_y_deg))["rgb"]
  for i, prompt in enumerate(prompts):
    turntable.write_gif(np.asarray(frames[i]), workdir / f"{names.for_prompt(prompt)}.gif",
                        fps=12)
  table = [{**row, "blob_iou": b["iou"]} for row, b in zip(final, blob)]
  ious = [row["iou"] for row in table]
  results = {
      "steps": config.num_steps,
      "seconds": seconds,
      "seconds_per_prompt": seconds / num_prompts,
      "frames_per_prompt": config.num_steps * num_views,
      "median_iou": float(np.median(ious)),
      "min_iou": float(np.min(ious)),
      "colors_right": int(sum(row["color_ok"] for row in table)),
      "per_prompt": table,
      "curve": curve,
  }
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results


def main(argv):
  del argv
  results = run(_CONFIG.value, _WORKDIR.value)
  print(f"{'prompt':24s} {'blob IoU':>8s} {'IoU':>6s} color")
  for row in results["per_prompt"]:
    print(f"{row['prompt']:24s} {row['blob_iou']:8.3f} {row['iou']:6.3f} {row['color']}"
          f"{'' if row['color_ok'] else '  (wrong)'}")
  print(f"median IoU {results['median_iou']:.3f}, min {results['min_iou']:.3f}, colors "
        f"{results['colors_right']}/{len(results['per_prompt'])}, "
        f"{results['seconds_per_prompt']:.0f} s per prompt")


if __name__ == "__main__":
  # Flags are defined here, not at import, so tests can import several
  # experiment modules into one process without absl flag clashes.
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/sds_single.py",
                                            "experiment config", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", "runs/sds_single", "where outputs are written")
  app.run(main)
