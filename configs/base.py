"""Shared defaults for every att3d_jax config.

Each experiment config (configs/<name>.py) starts from `get_base_config()` and
overrides what it needs. Units: angles in degrees, distances in scene units
(the object lives inside the sphere of radius `render.scene_radius`).
"""

import ml_collections

from att3d_jax.shapes import scenes


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Every random choice derives from this via fold_in.

  # Random orbit cameras around the origin (nerf/cameras.py). DreamFusion-like.
  config.camera = ml_collections.ConfigDict()
  config.camera.elevation_range_deg = (-10.0, 90.0)  # uniform elevation
  config.camera.azimuth_range_deg = (-180.0, 180.0)  # uniform azimuth; 0 = front
  config.camera.distance_range = (1.5, 2.0)  # camera distance to the origin
  config.camera.fov_y_range_deg = (40.0, 70.0)  # vertical field of view
  config.camera.height = 64  # rendered image size in pixels
  config.camera.width = 64

  # Instant-NGP multiresolution hash grid (nerf/hashgrid.py).
  config.hashgrid = ml_collections.ConfigDict()
  config.hashgrid.num_levels = 16  # L
  config.hashgrid.log2_table_size = 19  # T = 2**log2_table_size entries per level
  config.hashgrid.features_per_level = 2  # F
  config.hashgrid.base_resolution = 16  # coarsest level's cells per axis
  config.hashgrid.max_resolution = 2048  # finest level's cells per axis

  # Shared small MLP decoding grid features (nerf/field.py).
  config.field = ml_collections.ConfigDict()
  config.field.hidden_width = 64
  config.field.num_hidden_layers = 1
  config.field.density_activation = "softplus"  # "softplus" | "trunc_exp"
  config.field.bias_scale = 10.0  # density blob: scale * (1 - |x| / radius)
  config.field.bias_radius = 0.5  # ATT3D: 10 * (1 - 2|x|)

  # Volume rendering (nerf/render.py).
  config.render = ml_collections.ConfigDict()
  config.render.scene_radius = 1.0  # rays are sampled inside this sphere
  config.render.num_samples = 64  # stratified samples per ray
  config.render.num_importance = 0  # extra samples by importance resampling
  # > 0: empty-space skipping: a gradient-free pass of this many samples per ray
  # places the num_samples rendered ones where the ray meets the surface.
  config.render.num_proposal = 0
  # Renders composite over this color (guidance kinds "if" and "sd"; the shapes
  # model uses its world's background).
  config.render.background_color = (1.0, 1.0, 1.0)
  return config


def set_shapes_world_cameras(camera: ml_collections.ConfigDict) -> None:
  """The shapes world's camera ranges and image size (att3d_jax/shapes/scenes.py)."""
  camera.elevation_range_deg = scenes.CAMERA_ELEVATION_RANGE_DEG
  camera.azimuth_range_deg = scenes.CAMERA_AZIMUTH_RANGE_DEG
  camera.distance_range = scenes.CAMERA_DISTANCE_RANGE
  camera.fov_y_range_deg = scenes.CAMERA_FOV_Y_RANGE_DEG
  camera.height = camera.width = scenes.IMAGE_SIZE
