"""Volume rendering: compositing against a brute-force loop, analytic
geometry, importance resampling, empty-space skipping (proposal
sampling), the background and an end-to-end render through the hash-grid field."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.nerf import background as bg
from att3d_jax.nerf import cameras as cam
from att3d_jax.nerf import field
from att3d_jax.nerf import hashgrid
from att3d_jax.nerf import render
from att3d_jax.nerf.cameras import Rays

WHITE = (1.0, 1.0, 1.0)

TINY_SPEC = hashgrid.HashGridSpec(num_levels=2, log2_table_size=8,
                                  features_per_level=2, base_resolution=4,
                                  max_resolution=16)


def _random_edges_and_density(rng, num_rays=7, num_bins=9):
  t_edges = np.sort(rng.uniform(0.5, 3.0, (num_rays, num_bins + 1)), axis=-1)
  density = rng.exponential(2.0, (num_rays, num_bins))
  density[0] = 0.0  # an empty ray
  density[1, 3] = 1e4  # an opaque bin
  directions = rng.normal(size=(num_rays, 3))  # not unit: widths scale by |d|
  return t_edges, density, directions


def _composite_bruteforce(density, t_edges, directions, rgb, normals):
  """Front-to-back loop with the transmittance as a running product."""
  num_rays, num_bins = density.shape
  weights = np.zeros_like(density)
  transmittance = np.zeros_like(density)
  for r in range(num_rays):
    remaining = 1.0
    for i in range(num_bins):
      width = (t_edges[r, i + 1] - t_edges[r, i]) * np.linalg.norm(directions[r])
      alpha = 1.0 - np.exp(-density[r, i] * width)
      transmittance[r, i] = remaining
      weights[r, i] = remaining * alpha
      remaining *= 1.0 - alpha
  t_mids = 0.5 * (t_edges[:, 1:] + t_edges[:, :-1])
  opacity = weights.sum(-1)
  return dict(weights=weights, transmittance=transmittance, opacity=opacity,
              depth=(weights * t_mids).sum(-1),
              normalized_depth=np.where(opacity > 0, (weights * t_mids).sum(-1) /
                                        np.maximum(opacity, 1e-30), 0.0),
              rgb=(weights[..., None] * rgb).sum(1),
              normal=(weights[..., None] * normals).sum(1))


def test_compositing_matches_bruteforce_loop():
  rng = np.random.default_rng(0)
  t_edges, density, directions = _random_edges_and_density(rng)
  rgb = rng.uniform(size=density.shape + (3,))
  normals = rng.normal(size=density.shape + (3,))
  expected = _composite_bruteforce(density, t_edges, directions, rgb, normals)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  weights, transmittance = render.compute_alpha_weights(
      f32(density), f32(t_edges), f32(directions))
  t_mids = render.bin_midpoints(f32(t_edges))
  out = render.composite(weights, f32(rgb), t_mids, f32(normals))
  normalized = render.composite(weights, f32(rgb), t_mids, normalize_depth=True)
  tol = dict(rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(weights, expected["weights"], **tol)
  np.testing.assert_allclose(transmittance, expected["transmittance"], **tol)
  for name in ("opacity", "depth", "rgb", "normal"):
    np.testing.assert_allclose(out[name], expected[name], **tol, err_msg=name)
  np.testing.assert_allclose(normalized["depth"], expected["normalized_depth"], **tol)
  assert "normal" not in normalized
  assert out["opacity"][0] == 0 and normalized["depth"][0] == 0
  np.testing.assert_allclose(out["opacity"][1], 1.0, atol=1e-6)


def test_rendered_color_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  t_edges, density, directions = _random_edges_and_density(rng, num_rays=3,
                                                           num_bins=6)
  density[1, 3] = 3.0  # finite differences cannot see through an opaque bin
  rgb = rng.uniform(size=density.shape + (3,))
  background = rng.uniform(size=(density.shape[0], 3))
  cotangent = rng.normal(size=(density.shape[0], 3))

  with jax.enable_x64(True):
    def loss(density):
      weights, _ = render.compute_alpha_weights(density, t_edges, directions)
      out = render.composite(weights, rgb, render.bin_midpoints(t_edges))
      color = out["rgb"] + (1 - out["opacity"])[:, None] * background
      return jnp.sum(color * cotangent)

    analytic = np.asarray(jax.grad(loss)(jnp.asarray(density, jnp.float64)))
    numeric = np.zeros_like(density)
    step = 1e-6
    for index in np.ndindex(density.shape):
      plus, minus = density.copy(), density.copy()
      plus[index] += step
      minus[index] -= step
      numeric[index] = (float(loss(plus)) - float(loss(minus))) / (2 * step)
  assert analytic.dtype == np.float64
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_intersect_sphere_analytic():
  origins = np.array([
      [3.0, 0.0, 0.0],  # through the center
      [3.0, 0.6, 0.0],  # off-center chord
      [0.0, 0.0, 0.0],  # starts inside
      [3.0, 0.0, 0.0],  # non-unit direction
      [3.0, 1.0, 0.0],  # tangent
      [3.0, 2.0, 0.0],  # misses
      [3.0, 0.0, 0.0],  # points away
  ], np.float32)
  directions = np.array([[-1, 0, 0], [-1, 0, 0], [0, 0, 1], [-2, 0, 0],
                         [-1, 0, 0], [-1, 0, 0], [1, 0, 0]], np.float32)
  near, far = render.intersect_sphere(Rays(jnp.asarray(origins),
                                           jnp.asarray(directions)), 1.0)
  np.testing.assert_allclose(near, [2.0, 2.2, 0.0, 1.0, 0.0, 0.0, 0.0], atol=1e-5)
  np.testing.assert_allclose(far, [4.0, 3.8, 1.0, 2.0, 0.0, 0.0, 0.0], atol=1e-5)


def test_stratified_samples_cover_interval_sorted():
  near = jnp.array([0.0, 1.0, 2.0])
  far = jnp.array([0.0, 3.0, 2.5])  # the first ray has an empty interval
  regular = render.stratified_samples(None, near, far, 4)
  np.testing.assert_allclose(regular[1], [1.0, 1.5, 2.0, 2.5, 3.0])
  np.testing.assert_array_equal(regular[0], 0.0)
  jittered = render.stratified_samples(jax.random.key(0), near, far, 64)
  assert jittered.shape == (3, 65)
  assert np.all(np.diff(jittered, axis=-1) >= 0)
  np.testing.assert_allclose(jittered[:, 0], near)
  np.testing.assert_allclose(jittered[:, -1], far)
  assert not np.allclose(jittered, render.stratified_samples(None, near, far, 64))


def _render(field_fn, rays, key, **kwargs):
  """`render.render_rays`, jitted: one compile is faster than many eager ops."""
  return jax.jit(lambda rays, key: render.render_rays(field_fn, rays, key, **kwargs))(
      rays, key)


def _constant_density_field(sigma, albedo=(0.2, 0.4, 0.6)):
  def field_fn(points):
    num_points = points.shape[0]
    return {"density": jnp.full((num_points,), sigma, jnp.float32),
            "albedo": jnp.broadcast_to(jnp.asarray(albedo, jnp.float32),
                                       (num_points, 3))}
  return field_fn


def _parallel_rays(offsets):
  """Rays along -x starting at x = 3, offset by `offsets` along y."""
  offsets = jnp.asarray(offsets, jnp.float32)
  origins = jnp.stack([jnp.full_like(offsets, 3.0), offsets,
                       jnp.zeros_like(offsets)], axis=-1)
  directions = jnp.broadcast_to(jnp.array([-1.0, 0.0, 0.0]), origins.shape)
  return Rays(origins, directions)


@pytest.mark.parametrize("num_importance,num_proposal", [(0, 0), (16, 0), (0, 12)])
def test_constant_density_sphere_opacity_is_exact(num_importance, num_proposal):
  sigma, radius = 1.3, 1.0
  offsets = np.array([0.0, 0.3, 0.7, 0.95, 1.2])
  rays = _parallel_rays(offsets)
  background = (0.9, 0.1, 0.5)
  out = _render(
      _constant_density_field(sigma), rays, jax.random.key(0), num_samples=32,
      scene_radius=radius, num_importance=num_importance, num_proposal=num_proposal,
      background_fn=functools.partial(bg.solid_background, background))
  chord = 2 * np.sqrt(np.maximum(radius**2 - offsets**2, 0.0))
  expected_opacity = 1 - np.exp(-sigma * chord)
  np.testing.assert_allclose(out["opacity"], expected_opacity, atol=1e-5)
  expected_rgb = (expected_opacity[:, None] * np.array([0.2, 0.4, 0.6]) +
                  (1 - expected_opacity)[:, None] * np.array(background))
  np.testing.assert_allclose(out["rgb"], expected_rgb, atol=1e-5)
  num_bins = 32 + num_importance - 1 if num_importance else 32
  assert out["weights"].shape == (5, num_bins)
  assert out["t_edges"].shape == (5, num_bins + 1)


def _box_field(points):
  """An opaque (density 50) axis-aligned box of side 0.6, off center, colored
  by position: sharp edges the samples must find."""
  inside = jnp.all(jnp.abs(points - jnp.array([0.1, 0.0, -0.1])) < 0.3, axis=-1)
  return {"density": jnp.where(inside, 50.0, 0.0),
          "albedo": jnp.clip(0.5 * points + 0.5, 0.0, 1.0)}


def _shapes_world_rays(num_cameras=4, size=32):
  cameras = cam.sample_cameras(jax.random.key(0), num_cameras, (-10.0, 80.0),
                               (-180.0, 180.0), (1.6, 2.0), (40.0, 50.0))
  rays = cam.generate_rays(cameras, size, size)
  return Rays(rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3))


def test_proposal_sampling_finds_the_surface():
  """Empty-space skipping against a 2048-sample render of a sharp box: 24
  proposal-placed samples beat 24 evenly spaced ones and come close to 48
  (the remaining error is on rays that only graze an edge, which the 16
  proposal samples can miss)."""
  rays = _shapes_world_rays()
  background_fn = functools.partial(bg.solid_background, WHITE)

  def opacity_error(key, **kwargs):
    out = _render(_box_field, rays, key, scene_radius=1.0,
                  background_fn=background_fn, **kwargs)
    return float(jnp.mean(jnp.abs(out["opacity"] - reference["opacity"])))

  reference = _render(_box_field, rays, None, num_samples=2048, scene_radius=1.0,
                      background_fn=background_fn)
  even_24 = opacity_error(None, num_samples=24)
  even_48 = opacity_error(None, num_samples=48)
  proposal_24 = opacity_error(None, num_samples=24, num_proposal=16)
  assert proposal_24 < 0.85 * even_24, (proposal_24, even_24)
  assert proposal_24 < 1.5 * even_48, (proposal_24, even_48)
  # Training renders jitter both passes: compare means over a few keys.
  keys = [jax.random.key(seed) for seed in range(3)]
  stochastic_even = np.mean([opacity_error(key, num_samples=24) for key in keys])
  stochastic = np.mean([opacity_error(key, num_samples=24, num_proposal=16) for key in keys])
  assert stochastic < 0.85 * stochastic_even, (stochastic, stochastic_even)


def test_proposal_edges_are_sorted_span_the_ray_and_carry_no_gradient():
  rays = _parallel_rays(np.array([0.0, 0.2, 0.5, 0.9, 1.5]))  # the last one misses
  near, far = render.intersect_sphere(rays, 1.0)

  def edges(scale):
    field_fn = lambda p: {"density": scale * _box_field(p)["density"],
                          "albedo": _box_field(p)["albedo"]}
    return render.proposal_edges(field_fn, rays, near, far, jax.random.key(0),
                                 jax.random.key(1), num_proposal=16, num_samples=20,
                                 uniform_share=0.1)

  t_edges = edges(1.0)
  assert t_edges.shape == (5, 21)
  assert np.all(np.diff(np.asarray(t_edges), axis=-1) >= 0)
  np.testing.assert_allclose(t_edges[:, 0], near, atol=1e-6)
  np.testing.assert_allclose(t_edges[:, -1], far, atol=1e-5)
  # The box spans x in [-0.2, 0.4], i.e. t in [2.6, 3.2] along these rays: the
  # central ray puts most of its bins there, not spread over its whole chord [2, 4].
  widths = np.diff(np.asarray(t_edges[0]))
  mids = 0.5 * (np.asarray(t_edges[0, 1:]) + np.asarray(t_edges[0, :-1]))
  assert np.sum((mids > 2.5) & (mids < 3.3)) >= 12
  assert widths.min() < 0.5 * 2.0 / 20
  # The pass only decides where to sample: no gradient flows through it.
  grad = jax.grad(lambda scale: jnp.sum(edges(scale)))(1.0)
  assert grad == 0.0
  with pytest.raises(ValueError, match="uniform_share"):
    render.proposal_edges(_box_field, rays, near, far, None, None, num_proposal=8,
                          num_samples=8, uniform_share=0.0)
  with pytest.raises(ValueError, match="choose one"):
    render.render_rays(_box_field, rays, None, num_samples=8, scene_radius=1.0,
                       background_fn=functools.partial(bg.solid_background, WHITE),
                       num_importance=4, num_proposal=4)


def test_dense_sphere_depth_is_entry_distance():
  offsets = np.array([0.0, 0.6])
  rays = _parallel_rays(offsets)
  num_samples = 256
  out = _render(
      _constant_density_field(1e4), rays, None, num_samples=num_samples,
      scene_radius=1.0, normalize_depth=True,
      background_fn=functools.partial(bg.solid_background, WHITE))
  near = 3.0 - np.sqrt(1 - offsets**2)
  bin_width = 2 * np.sqrt(1 - offsets**2) / num_samples
  np.testing.assert_allclose(out["depth"], near + bin_width / 2, atol=1e-4)
  np.testing.assert_allclose(out["opacity"], 1.0, atol=1e-6)


def test_resample_concentrates_where_weights_are_high():
  num_bins = 16
  t_edges = jnp.broadcast_to(jnp.linspace(1.0, 3.0, num_bins + 1), (3, num_bins + 1))
  weights = np.zeros((3, num_bins), np.float32)
  weights[0, 5] = 0.9  # one peak
  weights[1, [2, 12]] = 0.5  # two equal peaks
  # weights[2] stays zero: the floor makes resampling uniform.
  for key in (None, jax.random.key(3)):
    new_edges = render.resample(key, t_edges, jnp.asarray(weights), 64)
    assert new_edges.shape == (3, 65)
    assert np.all(np.diff(new_edges, axis=-1) >= 0)
    np.testing.assert_allclose(new_edges[:, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(new_edges[:, -1], 3.0, atol=1e-6)
    new_mids = np.asarray(render.bin_midpoints(new_edges))
    peak_lo, peak_hi = t_edges[0, 5], t_edges[0, 6]
    assert np.mean((new_mids[0] >= peak_lo) & (new_mids[0] <= peak_hi)) > 0.9
    in_peaks = [np.mean((new_mids[1] >= t_edges[0, b]) &
                        (new_mids[1] <= t_edges[0, b + 1])) for b in (2, 12)]
    np.testing.assert_allclose(in_peaks, 0.5, atol=0.05)
  np.testing.assert_allclose(
      render.resample(None, t_edges, jnp.asarray(weights), 8)[2],
      np.linspace(1.0, 3.0, 9), atol=1e-5)


def test_solid_background():
  directions = render.safe_normalize(jax.random.normal(jax.random.key(0), (10, 3)))
  np.testing.assert_array_equal(bg.solid_background((1.0, 1.0, 1.0), directions),
                                np.ones((10, 3)))
  np.testing.assert_allclose(bg.solid_background((0.2, 0.4, 0.6), directions),
                             np.broadcast_to([0.2, 0.4, 0.6], (10, 3)), rtol=1e-6)


def test_render_rays_end_to_end_jit_and_grads():
  keys = jax.random.split(jax.random.key(0), 2)
  mlp = field.FieldMLP(hidden_width=16)
  params = {
      "mlp": field.init_mlp_params(keys[0], mlp, TINY_SPEC),
      "tables": hashgrid.init_tables(keys[1], TINY_SPEC, init_scale=0.1),
  }
  cameras = cam.sample_cameras(jax.random.key(1), 2)
  rays = cam.generate_rays(cameras, 6, 5)
  flat_rays = Rays(rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3))
  num_rays = flat_rays.origins.shape[0]

  def loss_and_out(params, key):
    field_fn = functools.partial(field.field_outputs, params["mlp"], params["tables"],
                                 spec=TINY_SPEC, mlp=mlp)
    out = render.render_rays(field_fn, flat_rays, key, num_samples=12,
                             scene_radius=1.0,
                             background_fn=functools.partial(bg.solid_background, WHITE),
                             num_importance=8)
    return jnp.mean(out["rgb"]), out

  (loss, out), grads = jax.jit(jax.value_and_grad(loss_and_out, has_aux=True))(
      params, jax.random.key(0))
  assert np.isfinite(loss)
  num_bins = 12 + 8 - 1  # stratified and importance bins share the endpoints
  expected_shapes = {"rgb": (num_rays, 3), "opacity": (num_rays,),
                     "depth": (num_rays,), "weights": (num_rays, num_bins),
                     "t_edges": (num_rays, num_bins + 1)}
  assert {k: v.shape for k, v in out.items()} == expected_shapes
  assert np.all((out["rgb"] >= 0) & (out["rgb"] <= 1))
  for name, grad in grads.items():
    leaves = jax.tree.leaves(grad)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves), name
    assert max(float(jnp.abs(leaf).max()) for leaf in leaves) > 0, name


def test_render_in_chunks_equals_one_batch():
  def blob_field(points):  # a density that varies from ray to ray
    radial = jnp.linalg.norm(points, axis=-1)
    return {"density": 30.0 * jnp.maximum(0.6 - radial, 0.0),
            "albedo": 0.5 + 0.5 * jnp.tanh(points)}
  rays = cam.generate_rays(cam.sample_cameras(jax.random.key(4), 2), 6, 5)

  def render_fn(rays):
    return render.render_rays(
        blob_field, rays, None, num_samples=16, scene_radius=1.0,
        background_fn=functools.partial(bg.solid_background, WHITE))

  chunked = jax.jit(
      lambda rays: render.render_in_chunks(render_fn, rays, chunk_size=7))(rays)
  flat_rays = Rays(rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3))
  whole = jax.jit(render_fn)(flat_rays)
  assert np.ptp(np.asarray(whole["opacity"])) > 0.5
  for name, value in whole.items():
    assert chunked[name].shape == (2, 6, 5) + value.shape[1:], name
    np.testing.assert_allclose(chunked[name].reshape(value.shape), value,
                               rtol=1e-5, atol=1e-6, err_msg=name)
