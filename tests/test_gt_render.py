"""Ground-truth renderer against analytic spheres and cubes, dense ray
marching, and the visibility of every prompt factor at 32x32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes


def _cameras(elevation_deg, azimuth_deg, distance, fov_deg):
  return cameras_lib.orbit_cameras(np.deg2rad(elevation_deg), np.deg2rad(azimuth_deg),
                                   distance, np.deg2rad(fov_deg))


def _render(prompt, cameras, height, width):
  images = gt_render.render_prompt_views(prompt, cameras, height, width)
  return {name: np.asarray(image, np.float64) for name, image in images.items()}


def _shade_numpy(albedo, normals):
  cosine = normals @ np.array(gt_render.LIGHT_DIRECTION)
  return np.array(albedo) * (gt_render.AMBIENT + (1 - gt_render.AMBIENT)
                             * np.maximum(cosine, 0.0))[..., None]


def test_sphere_matches_analytic_ray_sphere_intersection():
  radius, distance, fov_deg, size = scenes.SPHERE_RADIUS, 2.0, 40.0, 64
  cameras = _cameras(20.0, 30.0, distance, fov_deg)
  images = _render("a purple sphere", cameras, size, size)
  rays = cameras_lib.generate_rays(cameras, size, size)
  origins = np.asarray(rays.origins, np.float64)
  directions = np.asarray(rays.directions, np.float64)

  along = np.sum(origins * directions, -1)
  line_distance = np.sqrt(np.sum(origins**2, -1) - along**2)  # Center to ray.
  inside = line_distance < radius
  clear = np.abs(line_distance - radius) > 1e-4  # Not on the silhouette.
  np.testing.assert_array_equal(images["mask"][clear], inside[clear])

  # The perspective silhouette of a sphere is a disk of radius f r / sqrt(D^2 - r^2).
  focal = 0.5 * size / np.tan(np.deg2rad(fov_deg) / 2)
  disk_area = np.pi * (focal * radius / np.sqrt(distance**2 - radius**2))**2
  assert abs(images["mask"].sum() / disk_area - 1) < 0.02

  depth = -along - np.sqrt(np.maximum(radius**2 - line_distance**2, 0.0))
  interior = line_distance < radius - 1e-2
  np.testing.assert_allclose(images["depth"][interior], depth[interior], atol=1e-4)
  normals = (origins + depth[..., None] * directions) / radius
  np.testing.assert_allclose(images["normal"][interior], normals[interior], atol=1e-3)
  np.testing.assert_allclose(images["rgb"][interior],
                             _shade_numpy(scenes.COLORS["purple"], normals)[interior],
                             atol=1e-3)
  np.testing.assert_allclose(images["rgb"][~inside & clear],
                             np.broadcast_to(scenes.BACKGROUND_RGB, (np.sum(~inside & clear), 3)),
                             atol=1e-6)
  np.testing.assert_array_equal(images["depth"][~inside & clear], 0.0)


def _ray_box(origins, directions, half):
  """Exact first hit of rays with the cube [-half, half]^3 (slab method).

  Returns (hit, depth, hit points).
  """
  with np.errstate(divide="ignore", invalid="ignore"):
    low = (-half - origins) / directions
    high = (half - origins) / directions
  t_enter = np.minimum(low, high).max(-1)
  t_exit = np.maximum(low, high).min(-1)
  hit = (t_enter <= t_exit) & (t_enter > 0)
  return hit, t_enter, origins + t_enter[..., None] * directions


def _closest_approach_to_box(origins, directions, t_end, half):
  """min over t in [0, t_end] of the distance from the ray point to the cube,
  for rays outside it there. Distance to a convex set is convex along a line,
  so a ternary search finds the minimum."""
  def distance(t):
    points = origins + t[..., None] * directions
    return np.linalg.norm(np.maximum(np.abs(points) - half, 0.0), axis=-1)

  low, high = np.zeros_like(t_end), t_end
  for _ in range(60):
    third = (high - low) / 3
    left_lower = distance(low + third) < distance(high - third)
    low, high = np.where(left_lower, low, low + third), np.where(left_lower, high - third, high)
  return distance(low)


@pytest.mark.parametrize("elevation_deg, azimuth_deg", [
    (0.0, 0.0),  # Face-on.
    (13.0, 25.0),  # The top face seen at grazing incidence (~1.5 degrees).
])
def test_cube_is_exact_at_pixel_centers(elevation_deg, azimuth_deg):
  half, distance = scenes.CUBE_HALF_SIZE, 2.0
  height, width = 48, 64  # Non-square on purpose.
  cameras = _cameras(elevation_deg, azimuth_deg, distance, 50.0)
  images = _render("a green cube", cameras, height, width)
  rays = cameras_lib.generate_rays(cameras, height, width)
  origins = np.asarray(rays.origins, np.float64)
  directions = np.asarray(rays.directions, np.float64)
  inside, depth, points = _ray_box(origins, directions, half)

  # Leave out rays within 1e-3 of an edge: at their hit point, or on the way
  # to it (or anywhere, for misses).
  approach = _closest_approach_to_box(origins, directions,
                                     np.where(inside, depth - 0.05, 4.0), half)
  in_face = np.sort(np.abs(points), axis=-1)[..., :2]  # The two in-face coordinates.
  edge_distance = np.where(inside, (half - in_face).min(-1), np.inf)
  clear = (approach > 1e-3) & (edge_distance > 1e-3)
  assert clear.mean() > 0.97 and inside.sum() > 500

  np.testing.assert_array_equal(images["mask"][clear], inside[clear])
  np.testing.assert_allclose(images["depth"][inside & clear], depth[inside & clear],
                             atol=1e-4)
  np.testing.assert_array_equal(images["depth"][~inside & clear], 0.0)
  # Face normals: the axis of the largest coordinate of the hit point.
  normals = np.where(np.abs(points) == np.abs(points).max(-1, keepdims=True),
                     np.sign(points), 0.0)
  face = inside & (edge_distance > 2 * gt_render.NORMAL_STEP)  # Normals blend at edges.
  np.testing.assert_allclose(images["rgb"][face],
                             _shade_numpy(scenes.COLORS["green"], normals)[face], atol=1e-5)


@pytest.mark.parametrize("prompt", ["a small white cone wearing a red top hat",
                                    "a blue torus wearing a pink beanie"])
def test_scene_matches_dense_ray_marching(prompt):
  """Sphere tracing vs the first inside sample of 20000 along each ray."""
  scene = scenes.encode_scene(scenes.parse_prompt(prompt))
  cameras = cameras_lib.sample_cameras(jax.random.PRNGKey(3), 2)
  rays = cameras_lib.generate_rays(cameras, 16, 16)
  images = jax.jit(gt_render.render_gt)(scene, rays)
  origins, directions = rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3)
  samples = jnp.linspace(0.0, 3.0, 20000)  # Spacing 1.5e-4; cameras at <= 2.

  def march(ray):
    origin, direction = ray
    distance = scenes.scene_sdf(origin + samples[:, None] * direction, scene)
    hit = jnp.any(distance < 0)
    depth = jnp.where(hit, samples[jnp.argmax(distance < 0)], jnp.inf)
    # How close the ray passes to a surface before it nears its hit point.
    margin = jnp.min(jnp.where(samples < depth - 0.05, jnp.abs(distance), jnp.inf))
    return hit, depth, margin

  hit, depth, margin = (np.asarray(x) for x in jax.jit(
      lambda rays: jax.lax.map(march, rays, batch_size=32))((origins, directions)))
  traced_hit = np.asarray(images["mask"]).reshape(-1) > 0
  traced_depth = np.asarray(images["depth"]).reshape(-1)
  assert hit.mean() > 0.1
  agree = (traced_hit == hit) & (~hit | (np.abs(traced_depth - depth) < 3e-4))
  assert np.all(agree | (margin < 2e-3)), (margin[~agree], depth[~agree],
                                          traced_depth[~agree])
  assert agree.mean() > 0.99


def test_sizes_and_hats_are_visible_at_32x32():
  cameras = _cameras(15.0, np.array([0.0, 90.0, 180.0, 270.0]), 2.0, 50.0)

  def render(prompt):
    images = _render(prompt, cameras, 32, 32)
    return images["mask"] > 0, images["rgb"]

  hat_masks = {}
  for shape in scenes.SHAPES:
    default, _ = render(f"a red {shape}")
    small, _ = render(f"a small red {shape}")
    # Area scales by 0.6^2: the small object loses >= half its pixels per view.
    assert np.all(small.sum((1, 2)) <= 0.5 * default.sum((1, 2))), shape
    for hat in scenes.HATS:
      mask, rgb = render(f"a small red {shape} wearing a yellow {hat}")
      # Yellow (green channel > 0.3) pixels: the red object and the
      # background (green <= 0.45 but red <= 0.25) have none.
      hat_pixels = mask & (rgb[..., 1] > 0.3) & (rgb[..., 0] > 0.4)
      assert np.all(hat_pixels.sum((1, 2)) >= 20), (shape, hat, hat_pixels.sum((1, 2)))
      hat_masks[shape, hat] = hat_pixels
  for shape in scenes.SHAPES:
    for i, first in enumerate(scenes.HATS):
      for second in scenes.HATS[i + 1:]:
        differ = hat_masks[shape, first] ^ hat_masks[shape, second]
        assert np.all(differ.sum((1, 2)) >= 15), (shape, first, second)


def test_render_views_batches_cameras_scenes_and_chunks_without_retracing():
  cameras = cameras_lib.sample_cameras(jax.random.PRNGKey(0), 4)
  cameras = jax.tree.map(lambda x: x.reshape((2, 2) + x.shape[1:]), cameras)
  prompts = ["a red cube wearing a blue top hat", "a small pink octahedron"]
  encoded = scenes.encode_scenes([scenes.parse_prompt(p) for p in prompts])
  singles = []
  for index in range(len(prompts)):
    singles.append(gt_render.render_views(jax.tree.map(lambda x, i=index: x[i], encoded),
                                          cameras, 16, 12))
    if index == 0:
      num_traces = gt_render.render_views._cache_size()
  assert gt_render.render_views._cache_size() == num_traces  # Not retraced.
  images = singles[0]
  assert images["rgb"].shape == images["normal"].shape == (2, 2, 16, 12, 3)
  assert images["mask"].shape == images["depth"].shape == (2, 2, 16, 12)
  assert set(np.unique(images["mask"])) == {0.0, 1.0}

  batched = jax.jit(jax.vmap(lambda scene: gt_render.render_views(
      scene, cameras, 16, 12)))(encoded)
  for index, single in enumerate(singles):
    for name in single:
      np.testing.assert_allclose(batched[name][index], single[name], atol=1e-4)

  # Chunks of 100 rays (with a padded last chunk) give the same images.
  rays = cameras_lib.generate_rays(cameras, 16, 12)
  chunked = jax.jit(gt_render.render_gt, static_argnames="ray_chunk_size")(
      jax.tree.map(lambda x: x[0], encoded), rays, ray_chunk_size=100)
  for name in images:
    np.testing.assert_allclose(chunked[name], images[name], atol=1e-4)
