"""Ground-truth quality of shapes-world NeRFs: PSNR, IoU, color, R-precision, factors.

Every prompt of a shapes set has an exact answer, so generated objects are
scored against GT renders from the same fixed views:

- psnr: rendered RGB vs GT RGB, both over the world's background color;
- iou: silhouette IoU of the NeRF's opacity (> 0.5) and the GT mask, per view,
  averaged;
- color_ok: the plurality of the judge's per-pixel color votes (eval/judge.py)
  over the NeRF's foreground pixels (opacity > 0.5) that the GT shows as the
  object, not its hat, in all views names the prompt's color;
- r_precision: the prompt whose GT renders are nearest (mean squared RGB error
  over the views) to the NeRF's renders is the prompt itself; the candidates
  are all prompts evaluated together (the GT analog of CLIP R-precision);
- factor_<factor> for each factor of the scene (FACTORS): the world scene
  whose GT is nearest to the NeRF's renders (the same squared error, among all
  3200 scenes of the grammar) has the prompt's value of that factor. Which
  parts of a prompt a model gets right: a render that is the GT of a scene one
  factor away gets exactly that factor wrong, and hat pixels cannot cost the
  object's color (the hat's color is a factor of its own). hat_color is
  undefined (None) for scenes without a hat, and wrong when the nearest scene
  has none. Chance levels (an uninformed guess of the factor's value):
  FACTOR_CHANCE.

  Not "nearer to the truth than to each scene that differs in that factor
  only" (the other factors held at their true values): squared errors punish
  a wrong color more than a missing object, so with one factor wrong the
  comparisons of the others break. Measured on GT renders of neighbors of "a
  small blue torus wearing a red top hat" (16 views at 16x16): a green torus
  lost shape too (background costs less than the wrong color); the normal
  size, or a party hat, lost the hat or its color as well.

Ground truth comes from shapes/gt_geometry.py (each of the world's 64
geometries traced once per camera set and process, then recolored), and the
squared errors to all candidate scenes from per-part sums (`part_statistics`):
for a candidate of geometry g with albedos a (object) and b (hat),

  |R - GT|^2 = sum_{background of g} |R - bg|^2
             + sum_{object of g} (|R|^2 - 2 s a.R + s^2 |a|^2) + (the same over the hat, b)

with s the shading factor of each pixel, so the sums over pixels are taken
once per (render, geometry) and every scene of that geometry costs O(1): all
3200 scenes for each render.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from att3d_jax.eval import judge
from att3d_jax.eval import metrics
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import gt_geometry
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes

FACTORS = ("color", "shape", "size", "hat", "hat_color")
FACTOR_METRICS = tuple(f"factor_{factor}" for factor in FACTORS)
# Chance level of each factor metric: 1 / the factor's number of values (hat:
# none or one of 3 hats).
FACTOR_CHANCE = {"factor_color": 1 / len(scenes.COLORS), "factor_shape": 1 / len(scenes.SHAPES),
                 "factor_size": 1 / len(scenes.SIZES), "factor_hat": 1 / (1 + len(scenes.HATS)),
                 "factor_hat_color": 1 / len(scenes.COLORS)}
# area_ratio: rendered silhouette area over the GT's, over a prompt's views;
# says whether the IoU lost is excess (> 1) or missing (< 1) silhouette.
METRIC_NAMES = ("r_precision", "iou", "area_ratio", "psnr", "color_acc") + FACTOR_METRICS
# Prompts per step of the batched color votes (bounds their memory).
VOTE_BATCH = 16


def eval_cameras(elevations_deg: Sequence[float] = (20.0, 50.0), views_per_elevation: int = 8,
                 distance: float = 1.8, fov_y_deg: float = 45.0) -> cameras_lib.Cameras:
  """The fixed evaluation views: a ring of azimuths at each elevation."""
  return cameras_lib.ring_cameras(elevations_deg, views_per_elevation, distance, fov_y_deg)


def ground_truth(prompts: Sequence[str], cameras: cameras_lib.Cameras, height: int,
                 width: int) -> dict[str, np.ndarray]:
  """GT renders of every prompt: rgb [P, V, H, W, 3], mask [P, V, H, W] and part
  [P, V, H, W] (gt_render.PART_*), equal to gt_render.render_views'."""
  return gt_geometry.scene_views([scenes.parse_prompt(p) for p in prompts], cameras, height,
                                 width)


def color_of(rgb: jax.Array, opacity: jax.Array, region: Optional[jax.Array] = None) -> str:
  """The named color most foreground pixels of rgb [V, H, W, 3] vote for
  (foreground: opacity [V, H, W] > 0.5, within `region` [V, H, W] bool if
  given); "none" if there are none."""
  masks = jnp.asarray(opacity) > 0.5
  if region is not None:
    masks = masks & jnp.asarray(region)
  if not bool(masks.any()):
    return "none"
  votes = np.asarray(judge.color_votes(jnp.asarray(rgb), masks)).sum(axis=0)
  return judge.COLOR_NAMES[int(np.argmax(votes))]


@jax.jit
def _color_votes(rgb: jax.Array, masks: jax.Array) -> jax.Array:
  """judge.color_votes summed over views: rgb [P, V, H, W, 3], masks [P, V, H, W]
  -> [P, num_colors], VOTE_BATCH prompts at a time."""
  return jax.lax.map(lambda args: jnp.sum(judge.color_votes(*args), axis=0), (rgb, masks),
                     batch_size=VOTE_BATCH)


@jax.jit
def part_statistics(rendered: jax.Array, part: jax.Array, shading: jax.Array) -> dict:
  """Per-part sums over the pixels of renders against geometries.

  Args:
    rendered: [P, X, 3] renders (X = views x pixels).
    part: [G, X] gt_render.PART_* of each geometry's pixels.
    shading: [G, X] their shading factors.

  Returns:
    dict of [P, G] float32 (the sums over pixels of one render and one
    geometry): background_error sum |R - background|^2 over the geometry's
    background; object_square, hat_square sum |R|^2 over its object, hat; and
    object_cross, hat_cross [P, G, 3] sum s R over its object, hat.
  """
  highest = jax.lax.Precision.HIGHEST  # no reduced-precision matmuls on accelerators
  masks = {name: (part == value).astype(jnp.float32) for name, value in (
      ("background", gt_render.PART_BACKGROUND), ("object", gt_render.PART_OBJECT),
      ("hat", gt_render.PART_HAT))}
  background = jnp.asarray(scenes.BACKGROUND_RGB, jnp.float32)
  square = jnp.sum(jnp.square(rendered), axis=-1)  # [P, X]
  stats = {"background_error": jnp.dot(jnp.sum(jnp.square(rendered - background), axis=-1),
                                       masks["background"].T, precision=highest)}
  for name in ("object", "hat"):
    stats[f"{name}_square"] = jnp.dot(square, masks[name].T, precision=highest)
    stats[f"{name}_cross"] = jnp.einsum("pxc,gx->pgc", rendered, masks[name] * shading,
                                        precision=highest)
  return stats


def candidate_errors(stats: dict, norms: dict, render: np.ndarray, geometry: np.ndarray,
                     object_rgb: np.ndarray, hat_rgb: np.ndarray) -> np.ndarray:
  """Summed squared errors of renders to candidate scenes, from `part_statistics`.

  Args:
    stats: `part_statistics` of the renders and geometries.
    norms: {"object", "hat"}: [G] sum s^2 over each geometry's object, hat.
    render, geometry: int rows of the renders and the geometries, broadcast
      together to the candidates' shape [...].
    object_rgb, hat_rgb: [..., 3] the candidates' albedos.

  Returns:
    [...] float64 sum over pixels and channels of (render - candidate GT)^2.
  """
  def at(name):
    return np.asarray(stats[name], np.float64)[render, geometry]

  error = at("background_error")
  for name, albedo in (("object", object_rgb), ("hat", hat_rgb)):
    albedo = np.asarray(albedo, np.float64)
    error = (error + at(f"{name}_square") - 2 * np.sum(albedo * at(f"{name}_cross"), axis=-1)
             + np.sum(albedo**2, axis=-1) * norms[name][geometry])
  return error


def score_prompts(prompts: Sequence[str], rendered_rgb: np.ndarray, opacity: np.ndarray,
                  cameras: cameras_lib.Cameras) -> list[dict]:
  """Per-prompt GT metrics.

  Args:
    prompts: P grammar prompts (the R-precision candidates).
    rendered_rgb: [P, V, H, W, 3] the NeRFs' renders over the world background.
    opacity: [P, V, H, W].
    cameras: the V cameras of the renders.

  Returns:
    one dict per prompt: prompt, psnr, iou, area_ratio, color, color_ok, retrieved
    (the nearest prompt by GT renders), r_hit, nearest_scene (the nearest
    world scene's prompt) and FACTOR_METRICS (bool; None where the scene lacks
    the factor).
  """
  rendered_rgb, opacity = np.asarray(rendered_rgb, np.float32), np.asarray(opacity)
  num_prompts, num_views, height, width = opacity.shape
  if rendered_rgb.shape != opacity.shape + (3,) or len(prompts) != num_prompts:
    raise ValueError(f"renders {rendered_rgb.shape} and opacity {opacity.shape} of "
                     f"{len(prompts)} prompts: expected [P, V, H, W, 3] and [P, V, H, W]")
  scene_list = [scenes.parse_prompt(p) for p in prompts]
  truth = gt_geometry.scene_views(scene_list, cameras, height, width)
  if truth["mask"].shape[1] != num_views:
    raise ValueError(f"renders of {num_views} views and {truth['mask'].shape[1]} cameras: "
                     "render the prompts from the same cameras")
  psnr = np.mean(np.asarray(metrics.psnr(rendered_rgb, truth["rgb"])), axis=1)
  iou = np.mean(np.asarray(metrics.silhouette_iou(opacity, truth["mask"])), axis=1)
  area_ratio = np.asarray(metrics.silhouette_area_ratio(opacity, truth["mask"],
                                                        axis=(1, 2, 3)))
  votes = np.asarray(_color_votes(rendered_rgb,
                                  (opacity > 0.5) & (truth["part"] == gt_render.PART_OBJECT)))

  # Squared errors of every render to every world scene's GT, from the per-part
  # sums against all 64 geometries.
  world = _world_scenes()
  geometry = gt_geometry.geometry_views(np.arange(len(gt_geometry.GEOMETRIES)), cameras,
                                        height, width)
  flat_part = geometry["part"].reshape(len(gt_geometry.GEOMETRIES), -1)
  flat_shading = geometry["shading"].reshape(len(gt_geometry.GEOMETRIES), -1)
  stats = part_statistics(rendered_rgb.reshape(num_prompts, -1, 3), flat_part, flat_shading)
  norms = {name: np.sum(np.where(flat_part == value, flat_shading.astype(np.float64)**2, 0.0),
                        axis=1)
           for name, value in (("object", gt_render.PART_OBJECT), ("hat", gt_render.PART_HAT))}
  errors = candidate_errors(stats, norms, np.arange(num_prompts)[:, None], world["geometry"],
                            world["object_rgb"], world["hat_rgb"])  # [P, S]
  nearest = [world["scenes"][i] for i in np.argmin(errors, axis=1)]
  # R-precision: the nearest among the evaluated prompts' scenes.
  columns = np.asarray([world["index"][scene] for scene in scene_list])
  retrieved = np.argmin(errors[:, columns], axis=1)

  rows = []
  for i, prompt in enumerate(prompts):
    color = ("none" if not votes[i].any() else judge.COLOR_NAMES[int(np.argmax(votes[i]))])
    scene = scene_list[i]
    rows.append({
        "prompt": prompt,
        "psnr": float(psnr[i]),
        "iou": float(iou[i]),
        "area_ratio": float(area_ratio[i]),
        "color": color,
        "color_ok": color == scene.color,
        "retrieved": prompts[int(retrieved[i])],
        "r_hit": bool(retrieved[i] == i),
        "nearest_scene": scenes.prompt_of(nearest[i]),
        **{f"factor_{factor}": (None if factor == "hat_color" and scene.hat is None
                                else getattr(nearest[i], factor) == getattr(scene, factor))
           for factor in FACTORS},
    })
  return rows


@functools.lru_cache(maxsize=1)
def _world_scenes() -> dict:
  """Every scene of the grammar: scenes [S], index {scene: row}, geometry [S]
  (rows of GEOMETRIES), object_rgb, hat_rgb [S, 3]."""
  world = scenes.all_scenes()
  return {"scenes": world, "index": {scene: row for row, scene in enumerate(world)},
          "geometry": np.asarray([gt_geometry.geometry_index(scene) for scene in world]),
          **gt_geometry.scene_albedos(world)}


def summarize(rows: Sequence[dict]) -> dict[str, Optional[float]]:
  """Means over prompts of METRIC_NAMES (r_precision = mean r_hit); a factor
  metric averages the prompts whose scene has the factor (None if none has:
  hat_color on a set without hats)."""
  if not rows:
    return {name: float("nan") for name in METRIC_NAMES}
  summary = {"r_precision": float(np.mean([r["r_hit"] for r in rows])),
             "iou": float(np.mean([r["iou"] for r in rows])),
             "area_ratio": float(np.mean([r["area_ratio"] for r in rows])),
             "psnr": float(np.mean([r["psnr"] for r in rows])),
             "color_acc": float(np.mean([r["color_ok"] for r in rows]))}
  for name in FACTOR_METRICS:
    defined = [r[name] for r in rows if r[name] is not None]
    summary[name] = float(np.mean(defined)) if defined else None
  return summary
