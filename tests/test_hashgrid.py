"""Hash-grid encoding against a brute-force numpy loop (values and gradients)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax.nerf import hashgrid

# Small grid with both kinds of levels: resolutions (4, 10, 25, 64); (4+1)^3 and
# (10+1)^3 vertices fit T = 4096 (dense), 26^3 and 65^3 do not (hashed).
SMALL_SPEC = hashgrid.HashGridSpec(num_levels=4, log2_table_size=12,
                                   features_per_level=2, base_resolution=4,
                                   max_resolution=64)
ENCODERS = {"encode": hashgrid.encode,
            "encode_reference": hashgrid.encode_reference}


def numpy_encode_with_grads(points, tables, spec, cotangent):
  """Brute force over points, levels and corners, with analytic gradients.

  Args:
    points: [N, 3] float64; clipped to [0, 1]^3.
    tables: [L, T, F] float64.
    spec: the grid's `HashGridSpec`.
    cotangent: [N, L*F], the gradient of a scalar loss w.r.t. the encoding.

  Returns:
    encoding [N, L*F], loss gradient w.r.t. tables [L, T, F] and w.r.t.
    points [N, 3] (zero along axes where the point is outside the cube).
  """
  num_levels, table_size, num_features = tables.shape
  encoding = np.zeros((len(points), num_levels * num_features))
  tables_grad = np.zeros_like(tables)
  points_grad = np.zeros_like(points)
  for n, point in enumerate(points):
    inside = (point >= 0) & (point <= 1)
    point = np.clip(point, 0, 1)
    for level, resolution in enumerate(spec.resolutions):
      features = slice(level * num_features, (level + 1) * num_features)
      position = point * resolution
      cell = np.minimum(np.floor(position), resolution - 1)
      fraction = position - cell
      for corner in itertools.product((0, 1), repeat=3):
        x, y, z = (int(c) + o for c, o in zip(cell, corner))
        if (resolution + 1)**3 <= table_size:
          index = x + (resolution + 1) * y + (resolution + 1)**2 * z
        else:  # Python ints: reduce mod 2**32 like uint32, then mod T.
          index = (x ^ (y * 2654435761) ^ (z * 805459861)) % 2**32 % table_size
        factors = np.where(corner, fraction, 1 - fraction)
        weight = np.prod(factors)
        corner_features = tables[level, index]
        encoding[n, features] += weight * corner_features
        tables_grad[level, index] += weight * cotangent[n, features]
        for axis in range(3):
          dweight = np.prod(np.delete(factors, axis)) * (1 if corner[axis] else -1)
          points_grad[n, axis] += (inside[axis] * resolution * dweight *
                                   cotangent[n, features] @ corner_features)
  return encoding, tables_grad, points_grad


def make_points(rng, spec, num_random=120):
  """Random points plus points on cell borders of every level (k / res on
  one to three axes, including the cube faces 0 and 1) and points outside."""
  points = [rng.uniform(0, 1, (num_random, 3))]
  for resolution in spec.resolutions:
    border = rng.uniform(0, 1, (12, 3))
    on_border = rng.uniform(size=(12, 3)) < 0.6
    on_border[:, 0] = True
    border[on_border] = rng.integers(0, resolution + 1, on_border.sum()) / resolution
    points.append(border)
  points.append(rng.uniform(-0.3, 1.3, (10, 3)))
  return np.concatenate(points)


def test_spec_resolutions_and_levels():
  # b = 16**(1/3) = 2.5198: floor(4 b^l) = 4, 10 (10.08), 25 (25.40), 64.
  assert SMALL_SPEC.resolutions == (4, 10, 25, 64)
  assert SMALL_SPEC.is_dense == (True, True, False, False)
  assert SMALL_SPEC.table_shape == (4, 4096, 2)
  assert SMALL_SPEC.num_output_features == 8
  spec = hashgrid.HashGridSpec()  # Instant-NGP defaults.
  assert len(spec.resolutions) == 16
  assert spec.resolutions[0] == 16 and spec.resolutions[-1] == 2048
  assert all(a < b for a, b in zip(spec.resolutions, spec.resolutions[1:]))
  # 59^3 = 205379 vertices fit 2^19 = 524288, 81^3 = 531441 do not.
  assert spec.resolutions[4:6] == (58, 80)
  assert spec.is_dense == (True,) * 5 + (False,) * 11
  assert hash(spec) == hash(hashgrid.HashGridSpec())


@pytest.mark.parametrize("kwargs, message", [
    (dict(base_resolution=64, max_resolution=16), "base_resolution"),
    (dict(num_levels=0), "num_levels"),
    (dict(log2_table_size=31), "log2_table_size"),
])
def test_spec_rejects_bad_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    hashgrid.HashGridSpec(**kwargs)


def test_spatial_hash_hand_values():
  table_size = 2**19
  cases = {
      (1, 0, 0): 1,
      (0, 1, 0): 489905,  # 2654435761 mod 2^19
      (0, 0, 1): 153493,  # 805459861 mod 2^19
      # 3 ^ (5 * 2654435761 mod 2^32 = 387276917)
      #   ^ (7 * 805459861 mod 2^32 = 1343251731) = 1191511397; mod 2^19:
      (3, 5, 7): 329061,
      # 2048 * prime overflows uint32: 0xa9712800 mod 2^19.
      (2048, 2048, 2048): 75776,
  }
  vertices = np.array(list(cases), np.uint32)
  hashed = hashgrid.spatial_hash(*vertices.T, table_size)
  assert hashed.dtype == jnp.uint32
  np.testing.assert_array_equal(hashed, list(cases.values()))


def test_dense_index_hand_values():
  x, y, z = (np.array(v, np.uint32) for v in ([1, 4, 0], [2, 4, 0], [3, 4, 1]))
  # 5 vertices per axis: x + 5 y + 25 z.
  np.testing.assert_array_equal(hashgrid.dense_index(x, y, z, np.uint32(4)),
                                [86, 124, 25])


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_values_and_gradients_match_numpy(name):
  encoder = ENCODERS[name]
  rng = np.random.default_rng(0)
  points = make_points(rng, SMALL_SPEC)
  tables = rng.uniform(-1, 1, SMALL_SPEC.table_shape)
  cotangent = rng.normal(size=(len(points), SMALL_SPEC.num_output_features))
  expected = numpy_encode_with_grads(points, tables, SMALL_SPEC, cotangent)

  # float64 so that the comparison isolates the algorithm from rounding.
  with jax.enable_x64(True):
    def loss(points, tables):
      return jnp.sum(encoder(points, tables, SMALL_SPEC) * cotangent)

    encoding = jax.jit(encoder, static_argnums=2)(points, tables, SMALL_SPEC)
    points_grad, tables_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        points, tables)
  for got, want in zip((encoding, tables_grad, points_grad), expected):
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  assert np.abs(expected[2]).max() > 1  # the point gradient is not trivially 0


def test_encode_equals_reference_float32():
  rng = np.random.default_rng(1)
  points = jnp.asarray(make_points(rng, SMALL_SPEC), jnp.float32)
  tables = hashgrid.init_tables(jax.random.PRNGKey(0), SMALL_SPEC, 1.0)
  cotangent = rng.normal(size=(len(points), SMALL_SPEC.num_output_features))
  results = []
  for encoder in (hashgrid.encode, hashgrid.encode_reference):
    def encode_and_grads(points, tables, encoder=encoder):
      loss = lambda p, t: jnp.sum(encoder(p, t, SMALL_SPEC) * cotangent)
      return (encoder(points, tables, SMALL_SPEC),
              *jax.grad(loss, argnums=(0, 1))(points, tables))
    results.append(jax.jit(encode_and_grads)(points, tables))
  # The two may round positions differently (e.g. a fused multiply-add): an
  # error of ulp(64) = 2^-17 in a fraction moves the output by at most
  # 3 * 2^-17 * max|table difference| = 3 * 2^-17 * 2 = 4.6e-5, and the point
  # gradient (scaled by res <= 64, 8 corners) by res times that.
  for got, want, atol in zip(results[0], results[1], (5e-5, 3e-3, 5e-5)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def test_vmap_over_prompts_equals_loop():
  num_prompts = 3
  rng = np.random.default_rng(2)
  points = jnp.asarray(rng.uniform(0, 1, (num_prompts, 50, 3)), jnp.float32)
  tables = jax.vmap(lambda k: hashgrid.init_tables(k, SMALL_SPEC, 1.0))(
      jax.random.split(jax.random.PRNGKey(3), num_prompts))
  cotangent = rng.normal(size=(num_prompts, 50, SMALL_SPEC.num_output_features))

  def loss(points, tables, cotangent):
    return jnp.sum(hashgrid.encode(points, tables, SMALL_SPEC) * cotangent)

  def encode_and_grads(points, tables, cotangent):
    return (hashgrid.encode(points, tables, SMALL_SPEC),
            *jax.grad(loss, argnums=(0, 1))(points, tables, cotangent))

  batched = jax.jit(jax.vmap(encode_and_grads))(points, tables, cotangent)
  shared_points = jax.jit(jax.vmap(hashgrid.encode, in_axes=(None, 0, None)),
                          static_argnums=2)(points[0], tables, SMALL_SPEC)
  single_prompt = jax.jit(encode_and_grads)
  for prompt in range(num_prompts):
    single = single_prompt(points[prompt], tables[prompt], cotangent[prompt])
    for got, want in zip(batched, single):  # encoding, point and table grads
      np.testing.assert_allclose(got[prompt], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(shared_points[1], single_prompt(
      points[0], tables[1], cotangent[0])[0], rtol=1e-6, atol=1e-6)


def test_batch_shape_dtype_and_level_order():
  tables = hashgrid.init_tables(jax.random.PRNGKey(0), SMALL_SPEC,
                                dtype=jnp.bfloat16)
  points = jax.random.uniform(jax.random.PRNGKey(1), (2, 5, 3))
  encoding = hashgrid.encode(points, tables, SMALL_SPEC)
  assert encoding.shape == (2, 5, SMALL_SPEC.num_output_features)
  assert encoding.dtype == jnp.bfloat16
  # Level-major: zeroing level 2's table zeroes exactly features 4 and 5.
  tables = tables.at[2].set(0)
  encoding = np.asarray(hashgrid.encode(points, tables, SMALL_SPEC), np.float32)
  assert np.all(encoding[..., 4:6] == 0) and np.all(encoding[..., :4] != 0)


def test_init_tables_range():
  tables = hashgrid.init_tables(jax.random.PRNGKey(0), SMALL_SPEC, 1e-4)
  assert tables.shape == SMALL_SPEC.table_shape and tables.dtype == jnp.float32
  assert 0.9e-4 < np.abs(tables).max() <= 1e-4


def test_bad_inputs_raise():
  tables = hashgrid.init_tables(jax.random.PRNGKey(0), SMALL_SPEC)
  with pytest.raises(ValueError, match=r"tables must have shape .*\(4, 4096, 2\)"):
    hashgrid.encode(jnp.zeros((4, 3)), tables[:, :100], SMALL_SPEC)
  with pytest.raises(ValueError, match=r"points must have shape \[\.\.\., 3\]"):
    hashgrid.encode(jnp.zeros((4, 2)), tables, SMALL_SPEC)


def test_equal_specs_share_one_compilation():
  traces = []

  def encode(points, tables, spec):
    traces.append(spec)  # runs only while tracing
    return hashgrid.encode(points, tables, spec)

  encode = jax.jit(encode, static_argnums=2)
  tables = hashgrid.init_tables(jax.random.PRNGKey(0), SMALL_SPEC)
  points = jnp.zeros((4, 3))
  for _ in range(2):  # a fresh but equal spec each time
    encode(points, tables, hashgrid.HashGridSpec(**vars(SMALL_SPEC)))
  assert len(traces) == 1


def test_second_order_and_forward_mode():
  """Normal-based losses differentiate the point gradient w.r.t. the tables,
  and forward mode (jvp) must work through the scan and its remat."""
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    points = rng.uniform(0, 1, (50, 3))
    tables = rng.uniform(-1, 1, SMALL_SPEC.table_shape)
    direction = rng.normal(size=tables.shape)
    mlp_weights = rng.normal(size=SMALL_SPEC.num_output_features)

    def normal_loss(tables):
      density = lambda p: jnp.sum(
          hashgrid.encode(p, tables, SMALL_SPEC) @ mlp_weights)
      return jnp.sum(jax.grad(density)(points)**2)

    # The density's point gradient is linear in the tables, so normal_loss is
    # quadratic in them and a central difference is exact up to rounding.
    step = 1e-3
    loss_at = jax.jit(normal_loss)
    finite_difference = (loss_at(tables + step * direction) -
                         loss_at(tables - step * direction)) / (2 * step)
    analytic = jnp.vdot(jax.jit(jax.grad(normal_loss))(tables), direction)
    np.testing.assert_allclose(analytic, finite_difference, rtol=1e-9)

    # Forward and reverse mode agree: <J v, u> = <v, J^T u>.
    encode = lambda p: hashgrid.encode(p, tables, SMALL_SPEC)
    v = rng.normal(size=points.shape)
    u = rng.normal(size=(len(points), SMALL_SPEC.num_output_features))
    forward = jnp.vdot(jax.jvp(encode, (points,), (v,))[1], u)
    reverse = jnp.vdot(v, jax.vjp(encode, points)[1](u)[0])
    np.testing.assert_allclose(forward, reverse, rtol=1e-12)
