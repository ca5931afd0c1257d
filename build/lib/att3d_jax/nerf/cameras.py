"""Orbit cameras around the origin, pixel rays, view labels and turntables.

Conventions (shared by the NeRF renderer and the ground-truth shapes renderer):
  * World frame is right-handed with +z up. Objects stand on the z axis and
    their "front" faces +x.
  * A camera orbits the origin at (elevation, azimuth, distance) and looks at
    the origin: position = distance * (cos(el) cos(az), cos(el) sin(az), sin(el)).
    Azimuth 0 sees the front, +-180 degrees the back.
  * `rotation` is camera-to-world with columns (right, up, backward), i.e. the
    OpenGL convention: the camera looks along its local -z axis.
  * Pixel (row, col) has its center at (col + 0.5, row + 0.5); row 0 is the top.
Angles are radians inside the code; configs give degrees.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# DreamFusion-style view-dependent prompting (threestudio's thresholds).
OVERHEAD_MIN_ELEVATION_DEG = 60.0  # at or above: "overhead view"
FRONT_MAX_AZIMUTH_DEG = 45.0  # |azimuth| below: "front view"
BACK_MIN_AZIMUTH_DEG = 135.0  # |azimuth| above: "back view"; else "side view"
VIEW_LABELS = ("front", "side", "back", "overhead")


class Cameras(NamedTuple):
  """A batch of pinhole orbit cameras; any leading batch shape `[...]`."""

  position: jax.Array  # [..., 3] camera center, world frame.
  rotation: jax.Array  # [..., 3, 3] camera-to-world, columns (right, up, backward).
  fov_y: jax.Array  # [...] vertical field of view, radians.
  elevation: jax.Array  # [...] radians.
  azimuth: jax.Array  # [...] radians, in [-pi, pi).
  distance: jax.Array  # [...] distance to the origin.


class Rays(NamedTuple):
  origins: jax.Array  # [..., 3]
  directions: jax.Array  # [..., 3], unit length.


def wrap_angle(angle: jax.Array) -> jax.Array:
  """Wraps radians to [-pi, pi)."""
  return (angle + jnp.pi) % (2 * jnp.pi) - jnp.pi


def orbit_cameras(elevation, azimuth, distance, fov_y) -> Cameras:
  """Cameras on a sphere around the origin looking at it.

  Args:
    elevation, azimuth, fov_y: radians, broadcastable to a common shape `[...]`.
    distance: distance from the origin, same broadcasting.

  Returns:
    `Cameras` with batch shape `[...]`.
  """
  elevation, azimuth, distance, fov_y = jnp.broadcast_arrays(
      *(jnp.asarray(v, jnp.float32) for v in (elevation, azimuth, distance, fov_y)))
  azimuth = wrap_angle(azimuth)
  cos_el, sin_el = jnp.cos(elevation), jnp.sin(elevation)
  cos_az, sin_az = jnp.cos(azimuth), jnp.sin(azimuth)
  backward = jnp.stack([cos_el * cos_az, cos_el * sin_az, sin_el], axis=-1)
  # right = normalize(forward x z_up), written in closed form so that it stays
  # defined straight overhead (elevation = 90 degrees).
  right = jnp.stack([-sin_az, cos_az, jnp.zeros_like(sin_az)], axis=-1)
  up = jnp.cross(backward, right)
  rotation = jnp.stack([right, up, backward], axis=-1)
  return Cameras(
      position=distance[..., None] * backward,
      rotation=rotation,
      fov_y=fov_y,
      elevation=elevation,
      azimuth=azimuth,
      distance=distance)


def sample_cameras(
    key: jax.Array,
    num_cameras: int,
    elevation_range_deg: Sequence[float] = (-10.0, 90.0),
    azimuth_range_deg: Sequence[float] = (-180.0, 180.0),
    distance_range: Sequence[float] = (1.5, 2.0),
    fov_y_range_deg: Sequence[float] = (40.0, 70.0),
) -> Cameras:
  """Random orbit cameras, each parameter uniform in its range.

  The defaults are DreamFusion's / threestudio's. Returns batch shape
  `[num_cameras]`.
  """
  keys = jax.random.split(key, 4)

  def uniform(k, lo_hi):
    lo, hi = lo_hi
    return jax.random.uniform(k, (num_cameras,), jnp.float32, lo, hi)

  return orbit_cameras(
      elevation=jnp.deg2rad(uniform(keys[0], elevation_range_deg)),
      azimuth=jnp.deg2rad(uniform(keys[1], azimuth_range_deg)),
      distance=uniform(keys[2], distance_range),
      fov_y=jnp.deg2rad(uniform(keys[3], fov_y_range_deg)))


def turntable_cameras(num_frames: int, elevation_deg: float = 20.0,
                      distance: float = 2.0, fov_y_deg: float = 50.0) -> Cameras:
  """A closed orbit: `num_frames` azimuths evenly spaced over 360 degrees,
  starting at the front (azimuth 0). Deterministic; batch shape `[num_frames]`."""
  azimuth = 2 * jnp.pi * jnp.arange(num_frames, dtype=jnp.float32) / num_frames
  return orbit_cameras(jnp.deg2rad(elevation_deg), azimuth, distance,
                       jnp.deg2rad(fov_y_deg))


def ring_cameras(elevations_deg: Sequence[float], views_per_elevation: int,
                 distance: float, fov_y_deg: float) -> Cameras:
  """Evaluation views: `views_per_elevation` evenly spaced azimuths at each
  elevation, offset by half a step from the front so that no view is a
  canonical one. Batch shape `[len(elevations_deg) * views_per_elevation]`,
  elevation-major."""
  azimuth = 2 * np.pi * (np.arange(views_per_elevation) + 0.5) / views_per_elevation
  elevation = np.deg2rad(np.repeat(np.asarray(elevations_deg, np.float32),
                                   views_per_elevation))
  return orbit_cameras(elevation, np.tile(azimuth, len(elevations_deg)), distance,
                       np.deg2rad(fov_y_deg))


def focal_length_px(fov_y: jax.Array, height: int) -> jax.Array:
  """Focal length in pixels for a vertical field of view (radians)."""
  return 0.5 * height / jnp.tan(0.5 * fov_y)


def generate_rays(cameras: Cameras, height: int, width: int) -> Rays:
  """One ray through the center of every pixel.

  Args:
    cameras: batch shape `[...]`.
    height, width: image size in pixels (square pixels).

  Returns:
    `Rays` with origins and unit directions of shape `[..., height, width, 3]`.
  """
  cols = jnp.arange(width, dtype=jnp.float32) + 0.5
  rows = jnp.arange(height, dtype=jnp.float32) + 0.5
  # Camera-frame direction for focal length 1 in units of half the image height.
  tan_half = jnp.tan(0.5 * cameras.fov_y)[..., None, None]  # [..., 1, 1]
  x = (cols[None, :] - 0.5 * width) / (0.5 * height) * tan_half  # [..., 1, W]
  y = (0.5 * height - rows[:, None]) / (0.5 * height) * tan_half  # [..., H, 1]
  x, y = jnp.broadcast_arrays(x, y)
  dirs_cam = jnp.stack([x, y, -jnp.ones_like(x)], axis=-1)  # [..., H, W, 3]
  dirs = jnp.einsum("...ij,...hwj->...hwi", cameras.rotation, dirs_cam)
  dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
  origins = jnp.broadcast_to(cameras.position[..., None, None, :], dirs.shape)
  return Rays(origins=origins, directions=dirs)


def view_index(elevation: jax.Array, azimuth: jax.Array) -> jax.Array:
  """Index into VIEW_LABELS for each camera (jittable). Radians in, int32 out."""
  abs_az = jnp.abs(jnp.rad2deg(wrap_angle(azimuth)))
  index = jnp.where(abs_az < FRONT_MAX_AZIMUTH_DEG, 0,
                    jnp.where(abs_az > BACK_MIN_AZIMUTH_DEG, 2, 1))
  index = jnp.where(jnp.rad2deg(elevation) >= OVERHEAD_MIN_ELEVATION_DEG, 3, index)
  return index.astype(jnp.int32)


def view_labels(cameras: Cameras) -> list[str]:
  """Host-side view labels ("front", "side", "back", "overhead") of a flat batch."""
  index = np.asarray(view_index(cameras.elevation, cameras.azimuth)).reshape(-1)
  return [VIEW_LABELS[i] for i in index]


def view_suffix(label: str) -> str:
  """The text appended to a prompt for view-dependent prompting."""
  if label not in VIEW_LABELS:
    raise ValueError(f"unknown view label {label!r}; expected one of {VIEW_LABELS}")
  return f", {label} view"
