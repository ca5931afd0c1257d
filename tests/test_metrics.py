"""GT metrics against hand-computed values."""

import numpy as np
import pytest

from att3d_jax.eval import metrics


def test_psnr_matches_formula():
  rng = np.random.default_rng(0)
  target = rng.uniform(size=(2, 8, 8, 3))
  rendered = np.clip(target + rng.normal(scale=0.05, size=target.shape), 0, 1)
  mse = ((rendered - target)**2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(metrics.psnr(rendered, target), -10 * np.log10(mse),
                             rtol=1e-5)
  assert np.isinf(metrics.psnr(target, target)).all()


def test_silhouette_iou():
  mask = np.zeros((4, 4))
  mask[:2, :2] = 1  # 4 pixels
  opacity = np.zeros((4, 4))
  opacity[:2, :3] = 0.9  # 6 pixels, 4 shared
  assert np.isclose(metrics.silhouette_iou(opacity, mask), 4 / 6)
  assert metrics.silhouette_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
  assert metrics.silhouette_iou(np.ones((4, 4)), np.zeros((4, 4))) == 0.0


def test_bounding_box_error_is_relative_to_reference_size():
  reference = metrics.bounding_box(np.array([[-1.0, -0.5, 0.0], [1.0, 0.5, 0.5]]))
  np.testing.assert_array_equal(reference, [[-1, -0.5, 0], [1, 0.5, 0.5]])
  shifted = reference + np.array([0.1, 0.0, 0.0])
  assert np.isclose(metrics.bounding_box_error(shifted, reference), 0.1 / 2.0)


def test_silhouette_area_ratio_counts_pixels_over_all_views():
  opacity = np.zeros((2, 4, 4), np.float32)
  opacity[0, :2, :] = 0.9  # 8 pixels
  opacity[1, 0, 0] = 0.5  # at the threshold: not silhouette
  mask = np.zeros((2, 4, 4), np.float32)
  mask[0, :, :2] = 1.0  # 8 pixels
  mask[1, :2, :2] = 1.0  # 4 pixels
  assert float(metrics.silhouette_area_ratio(opacity, mask)) == pytest.approx(8 / 12)
  assert float(metrics.silhouette_area_ratio(opacity, np.zeros_like(mask))) == 8.0
  per_image = np.asarray(metrics.silhouette_area_ratio(opacity, mask, axis=(1, 2)))
  np.testing.assert_allclose(per_image, [8 / 8, 0 / 4])
