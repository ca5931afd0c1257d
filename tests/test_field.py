"""NeRF field: density bias, trunc_exp, outputs, conditioning and per-prompt
tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.nerf import field
from att3d_jax.nerf import hashgrid

TINY_SPEC = hashgrid.HashGridSpec(num_levels=3, log2_table_size=8,
                                  features_per_level=2, base_resolution=4,
                                  max_resolution=16)


def _points(num, radius, seed=0):
  """`num` random points with norms in [0.1 radius, radius]."""
  rng = np.random.default_rng(seed)
  directions = rng.normal(size=(num, 3))
  directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
  return (directions * rng.uniform(0.1, 1.0, (num, 1)) * radius).astype(np.float32)


def _field(seed=0, init_scale=0.1, conditioning_dim=0, **mlp_kwargs):
  mlp = field.FieldMLP(hidden_width=16, **mlp_kwargs)
  mlp_key, table_key = jax.random.split(jax.random.key(seed))
  mlp_params = field.init_mlp_params(mlp_key, mlp, TINY_SPEC, conditioning_dim)
  tables = hashgrid.init_tables(table_key, TINY_SPEC, init_scale)
  return mlp, mlp_params, tables


def _jitted_outputs(mlp, **kwargs):
  """field_outputs(mlp_params, tables, points, conditioning), jitted."""
  return jax.jit(lambda mlp_params, tables, points, conditioning=None:
                 field.field_outputs(mlp_params, tables, points, TINY_SPEC, mlp=mlp,
                                     conditioning=conditioning, **kwargs))


def test_density_bias_is_att3d_blob():
  points = np.array([[0, 0, 0], [0.5, 0, 0], [0, 0.3, 0.4], [0.6, 0.8, 0],
                     [0.1, -0.2, 0.2]], np.float32)
  expected = 10 * (1 - 2 * np.linalg.norm(points, axis=-1))
  np.testing.assert_allclose(field.density_bias(points), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(field.density_bias(points, scale=3.0, radius=2.0),
                             3 * (1 - np.linalg.norm(points, axis=-1) / 2), rtol=1e-6)
  gradient = jax.grad(lambda p: field.density_bias(p).sum())(jnp.asarray(points))
  assert np.all(np.isfinite(gradient))  # also at the origin
  np.testing.assert_allclose(gradient[1], [-20, 0, 0], rtol=1e-6)


def test_trunc_exp_value_and_clipped_gradient():
  x = jnp.array([-3.0, 0.0, 2.0, 15.0, 20.0, 40.0])
  np.testing.assert_allclose(field.trunc_exp(x), np.exp(np.asarray(x)), rtol=1e-6)
  gradient = jax.vmap(jax.grad(field.trunc_exp))(x)
  np.testing.assert_allclose(gradient, np.exp(np.minimum(np.asarray(x), 15.0)),
                             rtol=1e-6)


@pytest.mark.parametrize("activation", ["softplus", "trunc_exp"])
def test_field_outputs_with_zero_grid_is_the_blob(activation):
  # Zero tables and zero MLP biases make the MLP output 0: the density is the
  # activated bias alone, the albedo sigmoid(0) = 0.5.
  mlp, mlp_params, tables = _field()
  points = _points(32, 1.0)
  out = _jitted_outputs(mlp, density_activation=activation)(
      mlp_params, jnp.zeros_like(tables), points)
  bias = 10 * (1 - 2 * np.linalg.norm(points, axis=-1))
  expected = np.log1p(np.exp(bias)) if activation == "softplus" else np.exp(bias)
  np.testing.assert_allclose(out["density"], expected, rtol=1e-5)
  np.testing.assert_allclose(out["albedo"], 0.5)
  assert set(out) == {"density", "albedo"}


def test_field_outputs_shapes_and_ranges():
  mlp, mlp_params, tables = _field(init_scale=1.0)
  points = _points(64, 1.0)
  out = _jitted_outputs(mlp)(mlp_params, tables, points)
  assert out["density"].shape == (64,)
  assert out["albedo"].shape == (64, 3)
  assert np.all(out["density"] >= 0)
  assert np.all((out["albedo"] > 0) & (out["albedo"] < 1))
  assert np.std(np.asarray(out["albedo"])) > 1e-2  # the grid shows through
  with pytest.raises(ValueError, match="unknown density_activation 'relu'"):
    field.field_outputs(mlp_params, tables, points, TINY_SPEC, mlp=mlp,
                        density_activation="relu")


@pytest.mark.parametrize("init_scale", [0.0, 1e-4])
def test_blob_normals_point_radially_outward(init_scale):
  mlp, mlp_params, tables = _field(init_scale=init_scale)
  points = _points(64, 0.9)
  normals = _jitted_outputs(mlp, compute_normals=True)(
      mlp_params, tables, points)["normal"]
  radial = points / np.linalg.norm(points, axis=-1, keepdims=True)
  np.testing.assert_allclose(normals, radial, atol=1e-3)


def test_normals_match_finite_differences_through_the_grid():
  with jax.enable_x64(True):
    # float64 throughout, so that central differences with a tiny step (which
    # almost never straddles a grid cell boundary) are accurate.
    mlp, mlp_params, tables = _field(seed=1, init_scale=1.0, dtype=jnp.float64)
    tables = tables.astype(jnp.float64)
    points = _points(32, 0.8, seed=1).astype(np.float64)
    step = 1e-7

    outputs = _jitted_outputs(mlp, scene_radius=1.5, compute_normals=True)
    normals = outputs(mlp_params, tables, points)["normal"]
    # Densities of all the shifted points in one call.
    shifts = np.concatenate([step * np.eye(3), -step * np.eye(3)])  # [6, 3]
    shifted = (points[None] + shifts[:, None]).reshape(-1, 3)
    density = np.asarray(outputs(mlp_params, tables, shifted)["density"]).reshape(6, -1)
    gradient = ((density[:3] - density[3:]) / (2 * step)).T
    assert normals.dtype == jnp.float64
  expected = -gradient / np.linalg.norm(gradient, axis=-1, keepdims=True)
  # The grid must matter, or this would only re-test the blob.
  radial = points / np.linalg.norm(points, axis=-1, keepdims=True)
  assert np.max(np.abs(expected - radial)) > 0.1
  np.testing.assert_allclose(normals, expected, atol=1e-5)


def test_conditioning_is_appended_to_the_features():
  mlp, mlp_params, tables = _field(conditioning_dim=5)
  points = _points(16, 1.0)
  conditioning = jax.random.normal(jax.random.key(7), (5,))

  jitted = _jitted_outputs(mlp)

  def outputs(conditioning):
    return jitted(mlp_params, tables, points, conditioning)

  shared = outputs(conditioning)
  per_point = outputs(jnp.broadcast_to(conditioning, (16, 5)))
  for name in ("density", "albedo"):
    np.testing.assert_allclose(shared[name], per_point[name], rtol=1e-6)
  other = outputs(conditioning + 1.0)
  assert np.max(np.abs(other["albedo"] - shared["albedo"])) > 1e-3
  # Same as feeding the concatenation to the MLP by hand.
  features = hashgrid.encode(0.5 * (points + 1.0), tables, TINY_SPEC)
  raw = mlp.apply({"params": mlp_params}, jnp.concatenate(
      [features, jnp.broadcast_to(conditioning, (16, 5))], axis=-1))
  np.testing.assert_allclose(shared["albedo"], jax.nn.sigmoid(raw[:, 1:]), rtol=1e-5)


def test_vmap_over_per_prompt_tables():
  mlp, mlp_params, _ = _field()
  num_prompts = 3
  tables = jax.vmap(lambda k: hashgrid.init_tables(k, TINY_SPEC, 1.0))(
      jax.random.split(jax.random.key(2), num_prompts))
  points = _points(16, 1.0)

  outputs = _jitted_outputs(mlp)

  def density(tables):
    return outputs(mlp_params, tables, points)["density"]

  batched = jax.vmap(density)(tables)
  assert batched.shape == (num_prompts, 16)
  for prompt in range(num_prompts):
    np.testing.assert_allclose(batched[prompt], density(tables[prompt]), rtol=1e-5)
  assert np.max(np.abs(batched[0] - batched[1])) > 1e-3
