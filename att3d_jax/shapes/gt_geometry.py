"""GT renders of many shapes-world scenes from the 64 geometries they share.

A scene's geometry is its (shape, size, hat): 8 x 2 x 4 = 64 in the whole
world. Its two colors only tint the geometry's parts: gt_render renders
`recolor(part, shading, object_rgb, hat_rgb)` of per-pixel part ids and
shading factors, one ray per pixel, no blending at edges. So evaluating
hundreds of prompts (and, for the per-factor metrics of eval/shapes_eval.py,
every scene one factor away from each) traces at most 64 scenes per camera
set: `geometry_views` renders the geometries it is asked for once per
(cameras, height, width) in this process and keeps them; `scene_views`
recolors them into any scenes' images, equal to gt_render.render_views of
those scenes (tests/test_shapes_eval.py).

Not cached on disk: the 64 geometries of configs/shapes.py's 16 evaluation
views at 32x32 take a few seconds to trace (docs/design.md, History), once per
process, against a file keyed by camera arrays that would go stale silently
whenever gt_render changes.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec
import numpy as np

from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes as scenes_lib

# (shape, size, hat or None): every geometry of the world, in a fixed order.
GEOMETRIES = tuple((shape, size, hat) for size in scenes_lib.SIZES
                   for shape in scenes_lib.SHAPES for hat in (None,) + scenes_lib.HATS)
_GEOMETRY_INDEX = {geometry: index for index, geometry in enumerate(GEOMETRIES)}
# Geometries traced per device per call: a fixed batch (the last one padded),
# so one compilation serves any number of them.
GEOMETRIES_PER_DEVICE = 4
# Camera sets whose geometries stay in memory (~5 MB each at 16 views of 32x32).
MAX_CACHED_CAMERA_SETS = 8

_cache: dict[tuple, dict[int, tuple[np.ndarray, np.ndarray]]] = {}


def geometry_index(scene: scenes_lib.Scene) -> int:
  """The index of scene's (shape, size, hat) into GEOMETRIES."""
  return _GEOMETRY_INDEX[(scene.shape, scene.size, scene.hat)]


def _geometry_scene(index: int) -> scenes_lib.Scene:
  """A scene of geometry `index` (its colors are irrelevant: white)."""
  shape, size, hat = GEOMETRIES[index]
  return scenes_lib.Scene("white", shape, size, hat, None if hat is None else "white")


@functools.lru_cache(maxsize=None)
def _tracer(height: int, width: int, num_steps: int, devices: tuple):
  """jitted (SceneArrays [G], cameras) -> (part [G, V, H, W] int8, shading
  [G, V, H, W] float32), G split over `devices`. Each device traces its
  scenes one after another (lax.map): batched scenes (vmap) would evaluate
  every shape's and hat's SDF at every step (lax.switch becomes a select)."""
  mesh = Mesh(np.asarray(devices), ("geometry",))

  def trace_local(scene_block, cameras):
    def one(scene):
      views = gt_render.render_gt(scene, cameras_lib.generate_rays(cameras, height, width),
                                  num_steps)
      return views["part"].astype(jnp.int8), views["shading"]
    return jax.lax.map(one, scene_block)

  return jax.jit(jax.shard_map(trace_local, mesh=mesh,
                               in_specs=(PartitionSpec("geometry"), PartitionSpec()),
                               out_specs=PartitionSpec("geometry"), check_vma=False))


def _camera_key(cameras: cameras_lib.Cameras, height: int, width: int, num_steps: int):
  arrays = tuple(np.asarray(leaf) for leaf in jax.tree.leaves(cameras))
  return (height, width, num_steps) + tuple((a.shape, a.dtype.str, a.tobytes())
                                            for a in arrays)


def geometry_views(indices: Sequence[int], cameras: cameras_lib.Cameras, height: int,
                   width: int, num_steps: int = gt_render.DEFAULT_NUM_STEPS
                   ) -> dict[str, np.ndarray]:
  """Part ids and shading factors of geometries from cameras (traced once).

  Args:
    indices: [G] indices into GEOMETRIES.
    cameras: batch shape [V].
    height, width: image size.
    num_steps: sphere-tracing steps (gt_render.render_gt).

  Returns:
    part: [G, V, H, W] int8, gt_render.PART_BACKGROUND / PART_OBJECT / PART_HAT.
    shading: [G, V, H, W] float32, gt_render.shading_factor (0 off the scene).
  """
  key = _camera_key(cameras, height, width, num_steps)
  cached = _cache.pop(key, {})
  _cache[key] = cached  # most recently used last
  while len(_cache) > MAX_CACHED_CAMERA_SETS:
    del _cache[next(iter(_cache))]
  missing = sorted(set(int(i) for i in indices) - set(cached))
  if missing:
    devices = tuple(jax.local_devices())
    batch = GEOMETRIES_PER_DEVICE * len(devices)
    trace = _tracer(height, width, num_steps, devices)
    outputs = []
    for start in range(0, len(missing), batch):
      block = missing[start:start + batch]
      block = block + block[-1:] * (batch - len(block))  # one shape, one compilation
      scene_arrays = scenes_lib.encode_scenes([_geometry_scene(i) for i in block])
      outputs.append(trace(scene_arrays, cameras))  # dispatched back to back
    parts = np.concatenate([np.asarray(part) for part, _ in outputs])
    shadings = np.concatenate([np.asarray(shading) for _, shading in outputs])
    for row, index in enumerate(missing):
      cached[index] = (parts[row], shadings[row])
  return {"part": np.stack([cached[int(i)][0] for i in indices]),
          "shading": np.stack([cached[int(i)][1] for i in indices])}


def scene_views(scene_list: Sequence[scenes_lib.Scene], cameras: cameras_lib.Cameras,
                height: int, width: int,
                num_steps: int = gt_render.DEFAULT_NUM_STEPS) -> dict[str, np.ndarray]:
  """GT images of scenes: gt_render.render_views' rgb, mask and part of each.

  Returns:
    rgb: [S, V, H, W, 3] float32 over scenes_lib.BACKGROUND_RGB.
    mask: [S, V, H, W] float32, 1 on the scene.
    part: [S, V, H, W] int8 (gt_render.PART_*).
  """
  indices = [geometry_index(scene) for scene in scene_list]
  unique, inverse = np.unique(np.asarray(indices, np.int64), return_inverse=True)
  geometry = geometry_views(unique, cameras, height, width, num_steps)
  part, shading = geometry["part"][inverse], geometry["shading"][inverse]
  albedos = scene_albedos(scene_list)
  rgb = gt_render.recolor(part, shading, albedos["object_rgb"][:, None, None, None],
                          albedos["hat_rgb"][:, None, None, None])
  return {"rgb": np.asarray(rgb), "mask": (part != gt_render.PART_BACKGROUND).astype(np.float32),
          "part": part}


def scene_albedos(scene_list: Sequence[scenes_lib.Scene]) -> dict[str, np.ndarray]:
  """object_rgb, hat_rgb: [S, 3] float32 albedos (hat_rgb 0 without a hat)."""
  object_rgb = [scenes_lib.COLORS[scene.color] for scene in scene_list]
  hat_rgb = [scenes_lib.COLORS[scene.hat_color] if scene.hat else (0.0, 0.0, 0.0)
             for scene in scene_list]
  return {"object_rgb": np.asarray(object_rgb, np.float32).reshape(-1, 3),
          "hat_rgb": np.asarray(hat_rgb, np.float32).reshape(-1, 3)}
