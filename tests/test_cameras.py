"""Camera model: geometry, view labels and turntables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.nerf import cameras as cam


def _random_cameras(num=16, seed=0):
  return cam.sample_cameras(jax.random.key(seed), num)


def test_rotation_is_orthonormal_and_looks_at_origin():
  cameras = _random_cameras()
  rot = np.asarray(cameras.rotation)
  np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2),
                             np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
  # The camera looks along -backward, i.e. toward the origin.
  forward = -rot[..., :, 2]
  to_origin = -np.asarray(cameras.position)
  to_origin /= np.linalg.norm(to_origin, axis=-1, keepdims=True)
  np.testing.assert_allclose(forward, to_origin, atol=1e-5)


@pytest.mark.parametrize("height,width", [(33, 33), (15, 41)])
def test_center_pixel_ray_passes_through_look_at_point(height, width):
  cameras = _random_cameras()
  rays = cam.generate_rays(cameras, height, width)
  assert rays.origins.shape == (16, height, width, 3)
  origin = np.asarray(rays.origins[:, height // 2, width // 2])
  direction = np.asarray(rays.directions[:, height // 2, width // 2])
  # Distance from the origin (the look-at point) to the ray's line.
  closest = origin - np.sum(origin * direction, -1, keepdims=True) * direction
  np.testing.assert_allclose(np.linalg.norm(closest, axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(rays.directions, axis=-1), 1.0, atol=1e-5)


def test_field_of_view_spans_image_height():
  cameras = cam.orbit_cameras(0.3, 1.0, 2.0, jnp.deg2rad(60.0))
  height = width = 64
  rays = cam.generate_rays(cameras, height, width)
  forward = -np.asarray(cameras.rotation)[:, 2]
  # The angle between the top edge (half a pixel above row 0's center) and the axis.
  top = np.asarray(rays.directions[0, width // 2 - 1])  # even width: average the two
  top = top + np.asarray(rays.directions[0, width // 2])
  top /= np.linalg.norm(top)
  focal = float(cam.focal_length_px(cameras.fov_y, height))
  expected = np.arctan((0.5 * height - 0.5) / focal)
  np.testing.assert_allclose(np.arccos(top @ forward), expected, atol=1e-5)
  # Row 0 is the top of the image: its rays point up (+z) relative to the axis.
  assert rays.directions[0, width // 2, 2] > forward[2]


def test_front_view_sees_plus_x_and_right_is_plus_y():
  cameras = cam.orbit_cameras(0.0, 0.0, 2.0, 1.0)
  np.testing.assert_allclose(cameras.position, [2.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(cameras.rotation[:, 0], [0.0, 1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(cameras.rotation[:, 1], [0.0, 0.0, 1.0], atol=1e-6)


def test_overhead_camera_is_well_defined():
  cameras = cam.orbit_cameras(jnp.pi / 2, 0.7, 2.0, 1.0)
  assert np.all(np.isfinite(np.asarray(cameras.rotation)))
  np.testing.assert_allclose(cameras.position, [0.0, 0.0, 2.0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.det(cameras.rotation), 1.0, atol=1e-5)


def test_sample_cameras_respects_ranges_and_is_deterministic():
  ranges = dict(elevation_range_deg=(0.0, 30.0), azimuth_range_deg=(-90.0, 90.0),
                distance_range=(2.5, 3.0), fov_y_range_deg=(40.0, 50.0))
  a = cam.sample_cameras(jax.random.key(3), 256, **ranges)
  b = cam.sample_cameras(jax.random.key(3), 256, **ranges)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  el, az, fov = (np.rad2deg(np.asarray(v)) for v in (a.elevation, a.azimuth, a.fov_y))
  assert el.min() >= 0 and el.max() <= 30
  assert az.min() >= -90 and az.max() <= 90
  assert fov.min() >= 40 and fov.max() <= 50
  assert a.distance.min() >= 2.5 and a.distance.max() <= 3.0


def test_turntable_is_evenly_spaced_and_closed():
  num_frames = 12
  cameras = cam.turntable_cameras(num_frames, elevation_deg=20.0, distance=2.0)
  positions = np.asarray(cameras.position)
  steps = np.linalg.norm(np.roll(positions, -1, axis=0) - positions, axis=-1)
  # Every step, the closing one from the last frame back to the first included.
  np.testing.assert_allclose(steps, steps[0], rtol=1e-5)
  azimuth_steps = np.diff(np.unwrap(np.asarray(cameras.azimuth)))
  np.testing.assert_allclose(azimuth_steps, 2 * np.pi / num_frames, atol=1e-5)
  np.testing.assert_allclose(cameras.azimuth[0], 0.0)
  np.testing.assert_allclose(np.rad2deg(cameras.elevation), 20.0, atol=1e-5)


@pytest.mark.parametrize("azimuth_deg,elevation_deg,label", [
    (0, 10, "front"), (44, 0, "front"), (-44, 0, "front"), (46, 0, "side"),
    (-90, 30, "side"), (134, 0, "side"), (136, 0, "back"), (-179, 0, "back"),
    (180, 0, "back"), (0, 60, "overhead"), (170, 80, "overhead"), (0, 59, "front"),
])
def test_view_labels_match_azimuth_buckets(azimuth_deg, elevation_deg, label):
  cameras = cam.orbit_cameras(np.deg2rad(elevation_deg), np.deg2rad(azimuth_deg), 2.0, 1.0)
  assert cam.view_labels(cameras) == [label]
  assert cam.view_suffix(label) == f", {label} view"


def test_view_labels_cover_all_buckets_on_a_full_orbit():
  azimuth = np.deg2rad(np.arange(-177.5, 180, 5.0))  # no sample on a bucket edge
  cameras = cam.orbit_cameras(0.0, azimuth, 2.0, 1.0)
  labels = cam.view_labels(cameras)
  expected = ["front" if abs(a) < 45 else "back" if abs(a) > 135 else "side"
              for a in np.rad2deg(np.asarray(cameras.azimuth))]
  assert labels == expected


def test_unknown_view_label_is_an_error():
  with pytest.raises(ValueError, match="unknown view label"):
    cam.view_suffix("diagonal")


def test_ring_cameras_avoid_canonical_azimuths():
  cameras = cam.ring_cameras((20.0, 50.0), 8, 2.0, 45.0)
  assert cameras.azimuth.shape == (16,)
  np.testing.assert_allclose(np.rad2deg(cameras.elevation[:8]), 20.0, atol=1e-5)
  np.testing.assert_allclose(np.rad2deg(cameras.elevation[8:]), 50.0, atol=1e-5)
  azimuth = np.sort(np.rad2deg(np.asarray(cameras.azimuth[:8])) % 360)
  np.testing.assert_allclose(azimuth, 22.5 + 45.0 * np.arange(8), atol=1e-4)
