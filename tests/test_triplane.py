"""The text -> triplane generator (amortize/triplane.py): bilinear triplane
sampling against a brute-force loop, the generator's shapes, init and config."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.amortize import mapping
from att3d_jax.amortize import triplane
from configs import shapes as shapes_config

RESOLUTION, FEATURES = 5, 3


def _tent_sample(plane: np.ndarray, u: float, v: float) -> np.ndarray:
  """Brute force: every texel [i, j] at (i, j) / (R - 1) weighted by the tent
  max(0, 1 - |x - i|) max(0, 1 - |y - j|) of the clamped position (x, y)."""
  resolution = plane.shape[0]
  x, y = (np.clip(c, 0.0, 1.0) * (resolution - 1) for c in (u, v))
  out = np.zeros(plane.shape[-1])
  for i, j in itertools.product(range(resolution), repeat=2):
    out += max(0.0, 1 - abs(x - i)) * max(0.0, 1 - abs(y - j)) * plane[i, j]
  return out


def _points(num_random: int = 40) -> np.ndarray:
  """[N, 3]: random points, some outside [0, 1]^3 (clamped), plus texel
  positions, the cube's corners and faces."""
  rng = np.random.default_rng(0)
  texels = rng.integers(0, RESOLUTION, (6, 3)) / (RESOLUTION - 1)
  corners = np.array(list(itertools.product((0.0, 1.0), repeat=3)))
  return np.concatenate([rng.uniform(-0.2, 1.2, (num_random, 3)), texels, corners,
                         [[0.5, 1.0, 0.3], [0.0, 0.61, 1.0]]]).astype(np.float32)


def test_sample_plane_matches_brute_force():
  plane = np.random.default_rng(1).normal(size=(RESOLUTION, RESOLUTION, FEATURES))
  coords = _points()[:, :2]
  got = triplane.sample_plane(jnp.asarray(plane, jnp.float32), jnp.asarray(coords))
  want = np.stack([_tent_sample(plane, u, v) for u, v in coords])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_align_corners_puts_texels_on_the_grid_and_the_faces():
  plane = np.random.default_rng(2).normal(size=(RESOLUTION, RESOLUTION, FEATURES))
  ij = np.array([[0, 0], [RESOLUTION - 1, 0], [2, 3], [RESOLUTION - 1, RESOLUTION - 1]])
  got = triplane.sample_plane(jnp.asarray(plane, jnp.float32),
                              jnp.asarray(ij / (RESOLUTION - 1), jnp.float32))
  np.testing.assert_allclose(got, plane[ij[:, 0], ij[:, 1]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("combine", triplane.COMBINE_MODES)
def test_triplane_features_match_brute_force(combine):
  planes = np.random.default_rng(3).normal(size=(3, RESOLUTION, RESOLUTION, FEATURES))
  points = _points()
  got = triplane.triplane_features(jnp.asarray(planes, jnp.float32), jnp.asarray(points),
                                   combine)
  samples = np.array([[_tent_sample(planes[p], point[a], point[b])
                       for p, (a, b) in enumerate(triplane.PLANE_AXES)] for point in points])
  want = samples.reshape(len(points), -1) if combine == "concat" else samples.sum(1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_triplane_features_point_gradient_matches_finite_differences():
  """Normals differentiate the features with respect to the points."""
  planes = jnp.asarray(np.random.default_rng(4).normal(
      size=(3, RESOLUTION, RESOLUTION, FEATURES)), jnp.float32)
  # Inside texel cells (bilinear is not differentiable on cell borders).
  point = jnp.array([0.31, 0.58, 0.12], jnp.float32)
  jacobian = jax.jacfwd(lambda p: triplane.triplane_features(planes, p[None])[0])(point)
  step = 1e-3
  for axis in range(3):
    offset = jnp.zeros(3).at[axis].set(step)
    central = (triplane.triplane_features(planes, (point + offset)[None])[0]
               - triplane.triplane_features(planes, (point - offset)[None])[0]) / (2 * step)
    np.testing.assert_allclose(jacobian[:, axis], central, rtol=1e-2, atol=1e-2)


def _config(**overrides):
  config = shapes_config.get_config("quick").mapping
  config.update(triplane_resolution=16, triplane_low_resolution=4, triplane_channels=8,
                triplane_features=4, triplane_hidden_width=16)
  config.update(overrides)
  return config


def _generator_and_variables(**overrides):
  generator = triplane.TriplaneGenerator.from_config(None, None, _config(**overrides))
  text = jax.random.normal(jax.random.key(0), (3, 12))
  return generator, generator.init(jax.random.key(1), text, jnp.zeros(3, jnp.int32)), text


@pytest.mark.parametrize("combine,spectral_norm", [("concat", True), ("sum", False)])
def test_generator_shapes_and_init(combine, spectral_norm):
  generator, variables, text = _generator_and_variables(triplane_combine=combine,
                                                        triplane_spectral_norm=spectral_norm)
  assert (mapping.SPECTRAL_STATS in variables) == spectral_norm
  out = generator.apply(variables, text, jnp.zeros(3, jnp.int32))
  assert out.tables.shape == (3, 3, 16, 16, 4) and out.tables.dtype == jnp.float32
  assert out.conditioning is None
  features = generator.encode(out.tables[0], jnp.full((7, 3), 0.4))
  assert features.shape == (7, generator.feature_dim)
  assert generator.feature_dim == (12 if combine == "concat" else 4)
  # Small features (~1e-2 without spectral norm, less with it): the untrained
  # field is the density blob (bias up to 10), as with the hypernet.
  assert 0 < float(jnp.abs(out.tables).max()) < 5e-2
  # A row's planes depend on its own embedding only, and rows differ.
  swapped = generator.apply(variables, text[::-1], jnp.zeros(3, jnp.int32)).tables
  np.testing.assert_allclose(swapped[::-1], out.tables, rtol=1e-4, atol=1e-9)
  assert float(jnp.abs(out.tables[0] - out.tables[1]).max()) > 1e-2 * float(
      jnp.abs(out.tables).max())


def test_resolution_equal_to_the_low_resolution_has_no_upsampling():
  generator, variables, text = _generator_and_variables(triplane_resolution=4)
  assert set(variables["params"]) == {"hidden", "planes", "output"}
  assert generator.apply(variables, text, jnp.zeros(3, jnp.int32)).tables.shape == (
      3, 3, 4, 4, 4)


@pytest.mark.parametrize("overrides,flag", [
    (dict(triplane_resolution=24), "triplane_resolution"),
    (dict(triplane_resolution=2), "triplane_resolution"),
    (dict(triplane_low_resolution=1, triplane_resolution=8), "triplane_low_resolution"),
    (dict(triplane_combine="product"), "triplane_combine"),
])
def test_bad_config_names_the_flag(overrides, flag):
  with pytest.raises(ValueError, match=flag):
    triplane.TriplaneGenerator.from_config(None, None, _config(**overrides))
