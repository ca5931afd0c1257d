"""Config of experiments/fit_gt.py: one hash-grid NeRF fit to ground-truth
multi-view renders of one shapes prompt (photometric loss, no diffusion model).

  python -m experiments.fit_gt --config=configs/fit_gt.py
  python -m experiments.fit_gt --config=configs/fit_gt.py:quick   # CI-sized
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.prompt = "a red cube wearing a blue party hat"  # any shapes-grammar prompt

  # Training views: random orbit cameras framing the whole scene.
  config.camera.elevation_range_deg = (-10.0, 80.0)
  config.camera.distance_range = (1.8, 2.4)
  config.camera.fov_y_range_deg = (40.0, 50.0)
  config.camera.height = 64
  config.camera.width = 64
  config.num_train_views = 100

  # Held-out views: a ring at each elevation, azimuths offset from the front by
  # half a step so that no held-out view repeats a canonical one.
  config.eval_elevations_deg = (20.0, 50.0)
  config.eval_views_per_elevation = 8
  config.eval_distance = 2.1
  config.eval_fov_y_deg = 45.0

  # A grid sized for one 64x64 object: finer levels would only fit noise.
  config.hashgrid.num_levels = 16
  config.hashgrid.log2_table_size = 16
  config.hashgrid.max_resolution = 512
  config.render.num_samples = 64

  # Optimization: Adam (Instant-NGP's eps), exponential learning-rate decay.
  config.num_steps = 2000
  config.time_budget_s = 540.0  # stop early past this (10-minute target incl. setup)
  config.rays_per_step = 4096
  config.learning_rate = 1e-2
  config.final_learning_rate = 1e-3
  config.adam_b1 = 0.9
  config.adam_b2 = 0.99
  config.adam_eps = 1e-15
  config.log_every = 100

  # Export.
  config.mesh_resolution = 128  # marching-cubes grid per axis
  # The surface is where one render sample step (2 scene_radius / num_samples)
  # reaches this opacity; see mesh.density_for_alpha.
  config.mesh_surface_alpha = 0.8
  config.turntable_frames = 24
  config.render_chunk_size = 4096  # rays per chunk when rendering full images

  if arg == "quick":
    config.num_train_views = 24
    config.camera.height = config.camera.width = 32
    config.hashgrid.num_levels = 8
    config.hashgrid.log2_table_size = 14
    config.hashgrid.max_resolution = 128
    config.render.num_samples = 32
    config.num_steps = 300
    config.time_budget_s = 120.0
    config.rays_per_step = 2048
    config.log_every = 50
    config.mesh_resolution = 64
    config.mesh_surface_alpha = 0.3  # a 300-step fit is still a soft volume
    config.turntable_frames = 8
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected None or 'quick'")
  return config
