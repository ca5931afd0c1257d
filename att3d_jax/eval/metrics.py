"""Image metrics against ground truth (shapes world)."""

import jax.numpy as jnp
import numpy as np


def psnr(rendered, target, max_value: float = 1.0):
  """Peak signal-to-noise ratio in dB of each image.

  Args:
    rendered, target: `[..., height, width, channels]` in [0, max_value].

  Returns:
    `[...]` PSNR per image; +inf for a perfect match.
  """
  mse = jnp.mean((jnp.asarray(rendered) - jnp.asarray(target))**2, axis=(-3, -2, -1))
  return 10.0 * jnp.log10(max_value**2 / mse)


def silhouette_iou(opacity, mask, threshold: float = 0.5):
  """Intersection over union of the rendered silhouette (opacity > threshold)
  and the ground-truth mask, per image: `[..., H, W]` -> `[...]`."""
  predicted = jnp.asarray(opacity) > threshold
  truth = jnp.asarray(mask) > 0.5
  intersection = jnp.sum(predicted & truth, axis=(-2, -1))
  union = jnp.sum(predicted | truth, axis=(-2, -1))
  return jnp.where(union > 0, intersection / jnp.maximum(union, 1), 1.0)


def silhouette_area_ratio(opacity, mask, threshold: float = 0.5, axis=None):
  """Rendered silhouette area (opacity > threshold) over the ground-truth mask's,
  summed over `axis` (None: all views of all images): < 1 is an object too
  small or thin, > 1 too large (e.g. a rim of half-opaque pixels around it)."""
  predicted = jnp.sum(jnp.asarray(opacity) > threshold, axis=axis)
  return predicted / jnp.maximum(jnp.sum(jnp.asarray(mask) > 0.5, axis=axis), 1)


def bounding_box(vertices) -> np.ndarray:
  """`[2, 3]` (min corner, max corner) of a point set `[N, 3]`."""
  vertices = np.asarray(vertices)
  return np.stack([vertices.min(axis=0), vertices.max(axis=0)])


def bounding_box_error(box, reference_box) -> float:
  """Largest corner displacement between two boxes, relative to the
  reference box's largest side: 0.05 means every face is within 5% of the
  reference object's size."""
  box, reference_box = np.asarray(box), np.asarray(reference_box)
  extent = float(np.max(reference_box[1] - reference_box[0]))
  return float(np.max(np.abs(box - reference_box)) / extent)
