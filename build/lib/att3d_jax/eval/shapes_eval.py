"""Ground-truth quality of shapes-world NeRFs: PSNR, silhouette IoU, color, R-precision.

Every prompt of a shapes set has an exact answer, so generated objects are
scored against GT renders from the same fixed views:

- psnr: rendered RGB vs GT RGB, both over the world's background color;
- iou: silhouette IoU of the NeRF's opacity (> 0.5) and the GT mask, per view,
  averaged;
- color_ok: the plurality of the judge's per-pixel color votes (eval/judge.py)
  over the NeRF's foreground in all views names the prompt's color;
- r_precision: the prompt whose GT renders are nearest (mean squared RGB error
  over the views) to the NeRF's renders is the prompt itself; the candidates
  are all prompts evaluated together (the GT analog of CLIP R-precision).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from att3d_jax.eval import judge
from att3d_jax.eval import metrics
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes

METRIC_NAMES = ("r_precision", "iou", "psnr", "color_acc")


def eval_cameras(elevations_deg: Sequence[float] = (20.0, 50.0), views_per_elevation: int = 8,
                 distance: float = 1.8, fov_y_deg: float = 45.0) -> cameras_lib.Cameras:
  """The fixed evaluation views: a ring of azimuths at each elevation."""
  return cameras_lib.ring_cameras(elevations_deg, views_per_elevation, distance, fov_y_deg)


def ground_truth(prompts: Sequence[str], cameras: cameras_lib.Cameras, height: int,
                 width: int) -> dict[str, np.ndarray]:
  """GT renders of every prompt: rgb [P, V, H, W, 3], mask [P, V, H, W]."""
  scene_arrays = scenes.encode_scenes([scenes.parse_prompt(p) for p in prompts])
  render = jax.jit(jax.vmap(lambda scene: gt_render.render_views(scene, cameras, height,
                                                                 width)))
  out = render(scene_arrays)
  return {"rgb": np.asarray(out["rgb"]), "mask": np.asarray(out["mask"])}


def color_of(rgb: jax.Array, opacity: jax.Array) -> str:
  """The named color most foreground pixels of rgb [V, H, W, 3] vote for
  (foreground: opacity [V, H, W] > 0.5); "none" if the renders are empty."""
  masks = jnp.asarray(opacity) > 0.5
  if not bool(masks.any()):
    return "none"
  votes = np.asarray(judge.color_votes(jnp.asarray(rgb), masks)).sum(axis=0)
  return judge.COLOR_NAMES[int(np.argmax(votes))]


def score_prompts(prompts: Sequence[str], rendered_rgb: np.ndarray, opacity: np.ndarray,
                  truth: dict[str, np.ndarray]) -> list[dict]:
  """Per-prompt GT metrics.

  Args:
    prompts: P grammar prompts (the R-precision candidates).
    rendered_rgb: [P, V, H, W, 3] the NeRFs' renders over the world background.
    opacity: [P, V, H, W].
    truth: `ground_truth(prompts, same cameras, H, W)`.

  Returns:
    one dict per prompt: prompt, psnr, iou, color, color_ok, retrieved
    (the nearest prompt by GT renders), r_hit.
  """
  rendered_rgb, opacity = np.asarray(rendered_rgb, np.float32), np.asarray(opacity)
  if rendered_rgb.shape != truth["rgb"].shape:
    raise ValueError(f"renders {rendered_rgb.shape} and ground truth {truth['rgb'].shape} "
                     "differ in shape; render the same prompts and cameras")
  # [P (rendered), P (truth)] mean squared error over views and pixels.
  flat_rendered = rendered_rgb.reshape(len(prompts), -1)
  flat_truth = truth["rgb"].reshape(len(prompts), -1)
  distances = (np.sum(flat_rendered**2, 1)[:, None] - 2.0 * flat_rendered @ flat_truth.T
               + np.sum(flat_truth**2, 1)[None, :])
  retrieved = np.argmin(distances, axis=1)
  rows = []
  for i, prompt in enumerate(prompts):
    color = color_of(rendered_rgb[i], opacity[i])
    rows.append({
        "prompt": prompt,
        "psnr": float(np.mean(metrics.psnr(rendered_rgb[i], truth["rgb"][i]))),
        "iou": float(np.mean(metrics.silhouette_iou(opacity[i], truth["mask"][i]))),
        "color": color,
        "color_ok": color == scenes.parse_prompt(prompt).color,
        "retrieved": prompts[int(retrieved[i])],
        "r_hit": bool(retrieved[i] == i),
    })
  return rows


def summarize(rows: Sequence[dict]) -> dict[str, float]:
  """Means over prompts of METRIC_NAMES (r_precision = mean r_hit)."""
  if not rows:
    return {name: float("nan") for name in METRIC_NAMES}
  return {"r_precision": float(np.mean([r["r_hit"] for r in rows])),
          "iou": float(np.mean([r["iou"] for r in rows])),
          "psnr": float(np.mean([r["psnr"] for r in rows])),
          "color_acc": float(np.mean([r["color_ok"] for r in rows]))}
