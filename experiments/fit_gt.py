r"""Fits one hash-grid NeRF to ground-truth renders of a shapes prompt.

The proof that the 3D core (cameras, hash grid, field, volume rendering, mesh
export) works before any diffusion model is involved: a photometric loss on
random rays of multi-view GT renders, then PSNR on held-out views and the
exported mesh's bounding box against the GT object's.

  python -m experiments.fit_gt --config=configs/fit_gt.py --workdir=runs/fit_gt
  python -m experiments.fit_gt --config=configs/fit_gt.py:quick \
      --config.prompt="a small green torus" --workdir=/tmp/fit_gt

Writes results.json, config.json, params.msgpack (grid tables + MLP),
heldout.png (GT row over rendered row), turntable.gif / .mp4 and
mesh.obj / .glb into --workdir.
"""

import functools
import json
import pathlib
import time

from absl import app
from absl import flags
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import tqdm

from att3d_jax.eval import metrics
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.nerf import mesh as mesh_lib
from att3d_jax.nerf import model
from att3d_jax.nerf import render as render_lib
from att3d_jax.nerf import turntable
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes


def render_images(params, spec, mlp, config, cameras) -> dict[str, jax.Array]:
  """Deterministic renders `[num_views, H, W, ...]` for evaluation."""
  return render_lib.render_images(
      model.render_fn(params, spec, mlp, config, background_color=scenes.BACKGROUND_RGB),
      cameras,
                                  config.camera.height, config.camera.width,
                                  config.render_chunk_size)


def gt_mesh_box(scene: scenes.SceneArrays, resolution: int, scene_radius: float):
  """Bounding box of the GT object's mesh: the same marching cubes as the NeRF
  export, on the exact SDF (inside where -sdf > 0)."""
  gt = mesh_lib.extract_mesh(lambda x: -scenes.scene_sdf(x, scene),
                             lambda x: jnp.zeros_like(x), resolution=resolution,
                             threshold=0.0, scene_radius=scene_radius)
  return metrics.bounding_box(gt.vertices)


def fit(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and exports; returns the results dict it also writes."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  scene = scenes.encode_scene(scenes.parse_prompt(config.prompt))
  spec = model.grid_spec(config)
  mlp = model.field_mlp(config)
  height, width = config.camera.height, config.camera.width
  root_key = jax.random.key(config.seed)

  # Training data: every pixel of every training view is one (ray, rgb) pair.
  train_cameras = cameras_lib.sample_cameras(
      jax.random.fold_in(root_key, 0), config.num_train_views,
      config.camera.elevation_range_deg, config.camera.azimuth_range_deg,
      config.camera.distance_range, config.camera.fov_y_range_deg)
  train_rays = cameras_lib.generate_rays(train_cameras, height, width)
  train_rgb = gt_render.render_views(scene, train_cameras, height, width)["rgb"]
  origins = train_rays.origins.reshape(-1, 3)
  directions = train_rays.directions.reshape(-1, 3)
  target_rgb = train_rgb.reshape(-1, 3)
  num_pixels = origins.shape[0]

  params = model.init_params(jax.random.fold_in(root_key, 1), spec, mlp)
  schedule = optax.exponential_decay(
      config.learning_rate, config.num_steps,
      config.final_learning_rate / config.learning_rate)
  optimizer = optax.adam(schedule, config.adam_b1, config.adam_b2, config.adam_eps)
  opt_state = optimizer.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, step):
    key = jax.random.fold_in(jax.random.fold_in(root_key, 3), step)
    ray_key, render_key = jax.random.split(key)
    index = jax.random.randint(ray_key, (config.rays_per_step,), 0, num_pixels)
    rays = cameras_lib.Rays(origins[index], directions[index])

    def loss_fn(params):
      out = model.render_fn(params, spec, mlp, config, render_key,
                            background_color=scenes.BACKGROUND_RGB)(rays)
      return jnp.mean((out["rgb"] - target_rgb[index])**2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.time()
  history = []
  step = 0
  progress = tqdm.tqdm(range(config.num_steps), desc="fit_gt")
  for step in progress:
    params, opt_state, loss = train_step(params, opt_state, step)
    if step % config.log_every == 0 or step == config.num_steps - 1:
      loss = float(loss)
      history.append({"step": step, "loss": loss, "seconds": time.time() - start})
      progress.set_postfix(loss=f"{loss:.5f}", psnr=f"{-10 * np.log10(loss):.2f} dB")
    if time.time() - start > config.time_budget_s:
      progress.write(f"time budget of {config.time_budget_s:.0f} s reached at step {step}")
      break
  progress.close()
  jax.block_until_ready(params)
  train_seconds = time.time() - start
  (workdir / "params.msgpack").write_bytes(flax.serialization.to_bytes(params))

  # Held-out views.
  cameras = cameras_lib.ring_cameras(config.eval_elevations_deg,
                                     config.eval_views_per_elevation, config.eval_distance,
                                     config.eval_fov_y_deg)
  rendered = render_images(params, spec, mlp, config, cameras)
  truth = gt_render.render_views(scene, cameras, height, width)
  view_psnr = np.asarray(metrics.psnr(rendered["rgb"], truth["rgb"]))
  view_iou = np.asarray(metrics.silhouette_iou(rendered["opacity"], truth["mask"]))

  # Mesh export and its bounding box against the GT object's.
  field_fn = model.field_fn(params, spec, mlp, config)
  mesh = mesh_lib.extract_mesh(
      lambda x: field_fn(x)["density"], lambda x: field_fn(x)["albedo"],
      resolution=config.mesh_resolution,
      threshold=mesh_lib.density_for_alpha(
          config.mesh_surface_alpha,
          2 * config.render.scene_radius / config.render.num_samples),
      scene_radius=config.render.scene_radius, clip_to_sphere=True,
      keep_largest_component=True)
  mesh_paths = mesh_lib.export_mesh(mesh, workdir, "mesh")
  mesh_box = metrics.bounding_box(mesh.vertices)
  truth_box = gt_mesh_box(scene, config.mesh_resolution, config.render.scene_radius)

  # Pictures: held-out GT over renders, and a turntable.
  turntable.save_png(np.concatenate([
      np.concatenate(list(truth["rgb"]), axis=1),
      np.concatenate(list(rendered["rgb"]), axis=1)], axis=0), workdir / "heldout.png")
  frames = render_images(params, spec, mlp, config, cameras_lib.turntable_cameras(
      config.turntable_frames, 20.0, config.eval_distance, config.eval_fov_y_deg))["rgb"]
  turntable.write_gif(np.asarray(frames), workdir / "turntable.gif", fps=12)
  turntable.write_mp4(np.asarray(frames), workdir / "turntable.mp4", fps=12)

  results = {
      "prompt": config.prompt,
      "steps": step + 1,
      "train_seconds": train_seconds,
      "seconds_per_step": train_seconds / (step + 1),
      "heldout_psnr_db": float(view_psnr.mean()),
      "heldout_psnr_db_per_view": view_psnr.tolist(),
      "heldout_iou": float(view_iou.mean()),
      "mesh_bbox": mesh_box.tolist(),
      "gt_bbox": truth_box.tolist(),
      "mesh_bbox_error": metrics.bounding_box_error(mesh_box, truth_box),
      "mesh_vertices": int(mesh.vertices.shape[0]),
      "files": {name: str(path) for name, path in mesh_paths.items()},
      "history": history,
  }
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results


def main(argv):
  del argv
  results = fit(_CONFIG.value, _WORKDIR.value)
  print(json.dumps({k: v for k, v in results.items()
                    if k not in ("history", "heldout_psnr_db_per_view")}, indent=2))


if __name__ == "__main__":
  # Flags are defined here, not at import, so tests can import several
  # experiment modules into one process without absl flag clashes.
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/fit_gt.py",
                                            "fit_gt config file", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", "runs/fit_gt", "where outputs are written")
  app.run(main)
