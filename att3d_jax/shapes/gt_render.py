"""Ground-truth renders of shapes-world scenes: sphere tracing of the scene SDF.

Uses the same pinhole orbit cameras and rays as the NeRF renderer
(`nerf/cameras.py`), so GT images, masks and depths line up pixel for pixel
with NeRF renders of the same cameras.

Shading is lambertian under one directional light fixed in the world (from the
upper front-left) plus a high ambient term:

  rgb = albedo * (AMBIENT + (1 - AMBIENT) * max(0, <normal, LIGHT_DIRECTION>))

The color of a surface point therefore does not depend on the camera, so a
NeRF with albedo shading can fit the renders exactly. Misses show
BACKGROUND_RGB.

Each ray hits one part (object, hat or nothing) and has no antialiasing, so a
render is exactly `recolor(part, shading, object_rgb, hat_rgb)`: scenes that
differ only in colors share their part ids and shading factors, and
`shapes/gt_geometry.py` renders each of the world's 64 geometries once and
recolors them into any scene's images.
"""

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import scenes as scenes_lib

AMBIENT = 0.6  # High, so that white stays bright on the shaded side.
# Unit vector toward the light: front (+x), up (+z) and left as seen from the
# front camera, whose right is +y.
LIGHT_DIRECTION = tuple(float(c) for c in np.array([1.0, -0.6, 1.2]) / np.sqrt(2.8))

SCENE_RADIUS = 1.0  # Tracing happens inside this sphere (the NeRF's bound).
# Sphere tracing crawls where a ray skims a surface: near a silhouette, and
# over a flat face seen almost edge-on. With 128 steps, masks and depths agree
# with dense ray marching except on rays that pass within ~1e-3 of a surface
# before their hit (< 0.1 pixel from a silhouette at 64x64; tested).
DEFAULT_NUM_STEPS = 128
# After tracing, secant (Newton) steps land converged rays exactly on the
# surface, also at grazing incidence, where tracing leaves them short by up to
# |SDF| / slope. Exact for planes.
REFINE_STEPS = 2
REFINE_RANGE = 1e-3  # Only rays this close to a surface are refined...
MIN_SLOPE = 0.01  # ...that approach it at least this fast: jumps <= 0.1.
SECANT_STEP = 1e-3  # Ray distance between the two secant samples.
# |SDF| below this after refinement counts as a hit. Converged rays end far
# below it (~1e-6); a larger value turns rays that stall while skimming a
# surface into hits on it rather than holes in whatever lies behind.
HIT_EPSILON = 1e-3
NORMAL_STEP = 1e-3  # Central-difference step for normals.
CPU_RAY_CHUNK_SIZE = 1024  # Fits the working set of a tracing step in L2.
# What each pixel shows (render_gt's "part"): a scene's rgb is `recolor` of
# its part ids and shading, so scenes that differ only in colors share them.
PART_BACKGROUND, PART_OBJECT, PART_HAT = 0, 1, 2
# Where the hat's and the object's surfaces coincide (a top hat's brim sunk
# into a cylinder of its radius), the object wins: without a margin rounding
# decides, differently in each compiled program.
PART_TIE_TOLERANCE = 1e-5


def _bounding_interval(origins: jax.Array, directions: jax.Array):
  """Ray distances where rays enter and leave the radius-SCENE_RADIUS sphere.

  Returns (t_near [...], t_far [...]); t_far < t_near for rays that miss it,
  t_near = 0 for origins inside it.
  """
  b = jnp.sum(origins * directions, axis=-1)
  c = jnp.sum(origins * origins, axis=-1) - SCENE_RADIUS**2
  discriminant = b * b - c
  root = jnp.sqrt(jnp.maximum(discriminant, 0.0))
  t_near = jnp.maximum(-b - root, 0.0)
  t_far = jnp.where(discriminant > 0.0, -b + root, -1.0)
  return t_near, t_far


def _normals(points: jax.Array, scene: scenes_lib.SceneArrays) -> jax.Array:
  """Unit SDF gradients by central differences: points [n, 3] -> [n, 3].

  Differences rather than autodiff because the exact SDFs are distances to
  segments, whose gradient right on the surface is rounding noise.
  """
  offsets = NORMAL_STEP * jnp.eye(3, dtype=points.dtype)  # [3, 3]
  forward = scenes_lib.scene_sdf(points[:, None, :] + offsets, scene)  # [n, 3]
  backward = scenes_lib.scene_sdf(points[:, None, :] - offsets, scene)
  gradient = forward - backward
  return gradient / jnp.maximum(jnp.linalg.norm(gradient, axis=-1, keepdims=True),
                                1e-12)


def trace(scene: scenes_lib.SceneArrays, origins: jax.Array, directions: jax.Array,
          num_steps: int = DEFAULT_NUM_STEPS):
  """First intersection of each ray with the scene.

  Args:
    scene: an unbatched SceneArrays.
    origins, directions: [n, 3], directions of unit length.
    num_steps: sphere-tracing steps.

  Returns:
    (t [n], hit [n] bool): ray distance to the first surface point, and
    whether there is one inside the bounding sphere.
  """
  t_near, t_far = _bounding_interval(origins, directions)

  def sdf_at(t):
    return scenes_lib.scene_sdf(origins + t[:, None] * directions, scene)

  # Sphere tracing: the SDF is a lower bound on the distance to any surface, so
  # stepping by it never crosses the first one. Clamping at t_far keeps missed
  # rays finite.
  t = jax.lax.fori_loop(0, num_steps,
                        lambda _, t: jnp.minimum(t + sdf_at(t), t_far), t_near)
  for _ in range(REFINE_STEPS):
    value = sdf_at(t)
    slope = (value - sdf_at(t - SECANT_STEP)) / SECANT_STEP
    refine = (jnp.abs(value) < REFINE_RANGE) & (slope < -MIN_SLOPE)
    t = jnp.where(refine, t - value / jnp.minimum(slope, -MIN_SLOPE), t)
  hit = (jnp.abs(sdf_at(t)) < HIT_EPSILON) & (t <= t_far) & (t_far >= t_near)
  return t, hit


def shading_factor(normals: jax.Array) -> jax.Array:
  """Lambertian + ambient factor under the world-fixed light: normals [..., 3]
  -> [...] in [AMBIENT, 1]."""
  cosine = jnp.sum(normals * jnp.asarray(LIGHT_DIRECTION, normals.dtype), axis=-1)
  return AMBIENT + (1.0 - AMBIENT) * jnp.maximum(cosine, 0.0)


def shade(albedo: jax.Array, normals: jax.Array) -> jax.Array:
  """Lambertian + ambient under the world-fixed light: [..., 3] -> [..., 3]."""
  return albedo * shading_factor(normals)[..., None]


def recolor(part: jax.Array, shading: jax.Array, object_rgb: jax.Array, hat_rgb: jax.Array,
            background_rgb=scenes_lib.BACKGROUND_RGB) -> jax.Array:
  """The rgb image of a scene from its geometry and its colors.

  Args:
    part: [...] int, PART_BACKGROUND / PART_OBJECT / PART_HAT per pixel.
    shading: [...] the `shading_factor` of each pixel's surface point.
    object_rgb, hat_rgb: [3] albedos (broadcast against [..., 3]).
    background_rgb: [3] color of missed rays.

  Returns:
    [..., 3] float32: albedo * shading on the object and the hat, the
    background elsewhere; what `render_gt` renders (it calls this).
  """
  albedo = jnp.where((part == PART_HAT)[..., None], jnp.asarray(hat_rgb, jnp.float32),
                     jnp.asarray(object_rgb, jnp.float32))
  return jnp.where((part == PART_BACKGROUND)[..., None],
                   jnp.asarray(background_rgb, jnp.float32), albedo * shading[..., None])


def _render_rays(scene: scenes_lib.SceneArrays, origins: jax.Array,
                 directions: jax.Array, num_steps: int,
                 background: jax.Array) -> dict[str, jax.Array]:
  """`render_gt` for flat rays: origins, directions [n, 3]."""
  t, hit = trace(scene, origins, directions, num_steps)
  points = origins + t[:, None] * directions
  normals = _normals(points, scene)
  object_distance, hat_distance = scenes_lib.scene_sdf_parts(points, scene)
  on_hat = hat_distance < object_distance - PART_TIE_TOLERANCE
  part = jnp.where(hit, jnp.where(on_hat, PART_HAT, PART_OBJECT), PART_BACKGROUND)
  part = part.astype(jnp.int32)
  shading = jnp.where(hit, shading_factor(normals), 0.0)
  return {
      "rgb": recolor(part, shading, scene.object_rgb, scene.hat_rgb, background),
      "mask": hit.astype(jnp.float32),
      "depth": jnp.where(hit, t, 0.0),
      "normal": jnp.where(hit[:, None], normals, 0.0),
      "part": part,
      "shading": shading,
  }


def render_gt(scene: Union[scenes_lib.Scene, scenes_lib.SceneArrays],
              rays: cameras_lib.Rays,
              num_steps: int = DEFAULT_NUM_STEPS,
              background_rgb=scenes_lib.BACKGROUND_RGB,
              ray_chunk_size: Optional[int] = None) -> dict[str, jax.Array]:
  """Renders one scene along arbitrary rays.

  Jittable (pass SceneArrays, e.g. from `encode_scene`, under jit) and
  vmappable over rays/cameras and over stacked SceneArrays.

  Args:
    scene: a Scene or its unbatched array encoding.
    rays: origins and unit directions, [..., 3] each.
    num_steps: sphere-tracing steps.
    background_rgb: [3] color of missed rays.
    ray_chunk_size: rays traced together (sequentially over chunks). None:
      CPU_RAY_CHUNK_SIZE on CPU, where larger chunks overflow the cache
      (4x slower at 64x64), and all rays at once on accelerators.

  Returns:
    dict with
      rgb: [..., 3] shaded color composited over the background.
      mask: [...] float32, 1 where the ray hits the scene, else 0.
      depth: [...] distance along the (unit) ray to the first hit, i.e. not
        z-depth; 0 where the ray misses.
      normal: [..., 3] world-frame unit surface normal; 0 where it misses.
      part: [...] int32 PART_BACKGROUND, PART_OBJECT or PART_HAT: what the
        ray hits (the hat where it is nearer than the object by more than
        PART_TIE_TOLERANCE).
      shading: [...] the `shading_factor` of the hit point; 0 where it misses.
  """
  if isinstance(scene, scenes_lib.Scene):
    scene = scenes_lib.encode_scene(scene)
  batch_shape = rays.origins.shape[:-1]
  origins = rays.origins.reshape(-1, 3).astype(jnp.float32)
  directions = rays.directions.reshape(-1, 3).astype(jnp.float32)
  background = jnp.asarray(background_rgb, jnp.float32)
  num_rays = origins.shape[0]
  if ray_chunk_size is None:
    ray_chunk_size = CPU_RAY_CHUNK_SIZE if jax.default_backend() == "cpu" else num_rays

  if num_rays <= ray_chunk_size:
    images = _render_rays(scene, origins, directions, num_steps, background)
  else:
    padding = -num_rays % ray_chunk_size
    chunks = [jnp.pad(x, ((0, padding), (0, 0)), mode="edge").reshape(
        -1, ray_chunk_size, 3) for x in (origins, directions)]
    images = jax.lax.map(
        lambda chunk: _render_rays(scene, *chunk, num_steps, background), chunks)
    images = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num_rays], images)
  return {name: image.reshape(batch_shape + image.shape[1:])
          for name, image in images.items()}


@functools.partial(jax.jit, static_argnames=("height", "width", "num_steps"))
def render_views(scene: scenes_lib.SceneArrays, cameras: cameras_lib.Cameras,
                 height: int, width: int,
                 num_steps: int = DEFAULT_NUM_STEPS) -> dict[str, jax.Array]:
  """Jitted images of one scene from cameras of batch shape [...]: every output
  of `render_gt` gets shape [..., height, width(, 3)]."""
  return render_gt(scene, cameras_lib.generate_rays(cameras, height, width),
                   num_steps)


def render_prompt_views(prompt: str, cameras: cameras_lib.Cameras, height: int,
                        width: int,
                        num_steps: int = DEFAULT_NUM_STEPS) -> dict[str, jax.Array]:
  """`render_views` of the scene a grammar prompt describes."""
  scene = scenes_lib.encode_scene(scenes_lib.parse_prompt(prompt))
  return render_views(scene, cameras, height, width, num_steps)
