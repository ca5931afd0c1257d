"""Instant-NGP multiresolution hash encoding (Mueller et al. 2022, Sec. 3).

A point x in [0, 1]^3 is looked up in `num_levels` grids whose resolutions grow
geometrically from `base_resolution` to `max_resolution`. On each level the
8 vertices of the cell holding x index a table of `table_size` feature vectors:
directly (x + (res+1) y + (res+1)^2 z) when the level's (res+1)^3 vertices fit
in the table, otherwise through the spatial hash of Eq. (4). The 8 features are
trilinearly interpolated and the levels are concatenated, level-major.

The tables are an input array rather than module parameters because in ATT3D
the mapping network emits them per prompt; `jax.vmap` over a leading prompt
axis of `tables` (and `points`) encodes several prompts in one call.

Layout and loop order (why `encode` is fast). The tables stay `[L, T, F]` with
the features minor, so a corner lookup is one contiguous read of F values.
`encode` walks the levels with `lax.scan`: each step gathers the 8 corners of
all N points from one level's `[T, F]` table, so the random reads hit a
4 MB working set (at the defaults) rather than all 64 MB of tables, and it
compiles to a single fused XLA loop (index math, 8 gathers and the weighted
sum) writing only `[N, F]`. Instant-NGP's CUDA kernel is level-major
for the same reason. One gather of all N*L*8 rows from a flat `[L*T, F]` view
was measured 5-10x slower on CPU: XLA iterates it point-major, so every point
touches all L tables (a 64 MB working set), and it materializes the
`[N, L, 8, F]` gathered features. The scan body is rematerialized
(`jax.checkpoint`): re-gathering in the backward pass is cheaper than storing
8 `[N, F]` residuals per level. See benchmarks/bench_hashgrid.py.

The forward pass alone is faster unrolled over levels, as in
`encode_reference` (the levels' gathers are independent and XLA runs them side
by side). Values from unrolled levels with derivatives from this scan (a
`custom_jvp`) were measured and not kept: its forward was 1.45x (default spec)
and 1.7x (configs/shapes.py's spec) faster, but the shapes train step, which
runs both passes, was 6% slower (311 vs 293 ms per step, 3 alternating runs
each, 2026-11-27).
"""

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Eq. (4) of Instant-NGP: h(x) = (xor_i x_i * pi_i) mod T, in uint32 arithmetic.
HASH_PRIMES = (1, 2654435761, 805459861)

# The 8 cell corners as (x, y, z) offsets of 0 (lower) or 1 (upper vertex).
_CORNERS = tuple(
    ((corner >> 0) & 1, (corner >> 1) & 1, (corner >> 2) & 1)
    for corner in range(8))


@dataclasses.dataclass(frozen=True)
class HashGridSpec:
  """Static hyperparameters of a hash grid; frozen, hence hashable, so it can
  be a static argument of `jax.jit`. Defaults are Instant-NGP's NeRF setup."""

  num_levels: int = 16  # L
  log2_table_size: int = 19  # T = 2**log2_table_size entries per level
  features_per_level: int = 2  # F
  base_resolution: int = 16  # cells per axis of the coarsest level
  max_resolution: int = 2048  # cells per axis of the finest level

  def __post_init__(self):
    if self.num_levels < 1:
      raise ValueError(f"num_levels must be >= 1, got {self.num_levels}.")
    if self.features_per_level < 1:
      raise ValueError(
          f"features_per_level must be >= 1, got {self.features_per_level}.")
    # Table indices are computed in uint32 and gathered with int32.
    if not 1 <= self.log2_table_size <= 30:
      raise ValueError(
          f"log2_table_size must be in [1, 30], got {self.log2_table_size}.")
    if not 1 <= self.base_resolution <= self.max_resolution:
      raise ValueError(
          f"need 1 <= base_resolution <= max_resolution, got base_resolution="
          f"{self.base_resolution}, max_resolution={self.max_resolution}.")
    # Vertex coordinates up to max_resolution + 1 must not wrap in uint32.
    if self.max_resolution >= 2**31:
      raise ValueError(
          f"max_resolution must be < 2**31, got {self.max_resolution}.")

  @property
  def table_size(self) -> int:
    return 2**self.log2_table_size

  @property
  def resolutions(self) -> tuple[int, ...]:
    """Cells per axis of each level: floor(base * b**level) with the growth
    factor b = exp((ln max - ln base) / (L - 1)) (Instant-NGP Eqs. 2-3)."""
    if self.num_levels == 1:
      return (self.base_resolution,)
    growth = math.exp((math.log(self.max_resolution) -
                       math.log(self.base_resolution)) / (self.num_levels - 1))
    # The 1e-6 absorbs exp/log rounding, so that e.g. the last level is exactly
    # max_resolution rather than max_resolution - 1.
    return tuple(
        math.floor(self.base_resolution * growth**level + 1e-6)
        for level in range(self.num_levels))

  @property
  def is_dense(self) -> tuple[bool, ...]:
    """Whether each level's (res+1)^3 vertices fit its table (direct index)."""
    return tuple((res + 1)**3 <= self.table_size for res in self.resolutions)

  @property
  def table_shape(self) -> tuple[int, int, int]:
    return (self.num_levels, self.table_size, self.features_per_level)

  @property
  def num_output_features(self) -> int:
    return self.num_levels * self.features_per_level


def init_tables(key: jax.Array, spec: HashGridSpec, init_scale: float = 1e-4,
                dtype=jnp.float32) -> jax.Array:
  """Tables `[L, T, F]` uniform in (-init_scale, init_scale) (Instant-NGP
  initializes with U(-1e-4, 1e-4))."""
  return jax.random.uniform(key, spec.table_shape, dtype, -init_scale,
                            init_scale)


def spatial_hash(x: jax.Array, y: jax.Array, z: jax.Array,
                 table_size: int) -> jax.Array:
  """Instant-NGP spatial hash (Eq. 4) of integer vertex coordinates.

  Args:
    x, y, z: broadcastable uint32 vertex coordinates.
    table_size: T, a power of two.

  Returns:
    uint32 `(x * 1 ^ y * 2654435761 ^ z * 805459861) mod T`, the products
    wrapping modulo 2**32.
  """
  prime_x, prime_y, prime_z = (np.uint32(p) for p in HASH_PRIMES)
  hashed = (x * prime_x) ^ (y * prime_y) ^ (z * prime_z)
  return hashed % np.uint32(table_size)


def dense_index(x: jax.Array, y: jax.Array, z: jax.Array,
                resolution) -> jax.Array:
  """Index of vertex (x, y, z), x fastest, in a grid with `resolution + 1`
  vertices per axis; all arguments broadcastable uint32."""
  stride = resolution + np.uint32(1)
  return x + stride * (y + stride * z)


def _clip_to_unit_cube(points: jax.Array) -> jax.Array:
  """Clips to [0, 1]^3, in at least float32 (positions reach max_resolution).

  Unlike `jnp.clip`, whose gradient is 1/2 on the boundary, this passes the
  full gradient for points on the cube's surface and zero outside it.
  """
  points = points.astype(jnp.promote_types(points.dtype, jnp.float32))
  inside = (points >= 0) & (points <= 1)
  return jnp.where(inside, points, jnp.clip(points, 0, 1))


def _cell_and_fraction(coord: jax.Array, resolution) -> tuple[jax.Array, jax.Array]:
  """Lower cell vertex and position inside the cell along one axis.

  Args:
    coord: [N] in [0, 1].
    resolution: cells per axis, a scalar.

  Returns:
    cell: [N] uint32 in [0, resolution - 1]; coord = 1 lands in the last cell
      with fraction 1 instead of a cell past the grid.
    fraction: [N] like `coord`, in [0, 1].
  """
  position = coord * resolution
  cell = jnp.minimum(jnp.floor(position), resolution - 1)
  return cell.astype(jnp.uint32), position - cell


def _corner_weight(fractions: Sequence[jax.Array], corner) -> jax.Array:
  """Trilinear weight [N] of `corner` (3 offsets in {0, 1}) given the
  per-axis fractions, 3 arrays [N]."""
  weight = 1
  for fraction, upper in zip(fractions, corner):
    weight = weight * (fraction if upper else 1 - fraction)
  return weight


def _check_inputs(points: jax.Array, tables: jax.Array, spec: HashGridSpec):
  if points.ndim < 1 or points.shape[-1] != 3:
    raise ValueError(f"points must have shape [..., 3], got {points.shape}.")
  if tables.shape != spec.table_shape:
    raise ValueError(
        f"tables must have shape (num_levels, table_size, features_per_level) "
        f"= {spec.table_shape} for {spec}, got {tables.shape}; for several "
        f"prompts vmap over the leading axis.")
  if not jnp.issubdtype(tables.dtype, jnp.floating):
    raise ValueError(f"tables must be floating point, got {tables.dtype}.")


def encode(points: jax.Array, tables: jax.Array, spec: HashGridSpec) -> jax.Array:
  """Multiresolution hash encoding, a `lax.scan` over levels.

  Args:
    points: [..., 3] in [0, 1]^3; values outside are clipped to the cube.
    tables: [num_levels, table_size, features_per_level].
    spec: the grid's static hyperparameters (`tables.shape == spec.table_shape`).

  Returns:
    [..., num_levels * features_per_level] in `tables.dtype`, level-major
    (feature `level * F + f`).
  """
  _check_inputs(points, tables, spec)
  batch_shape = points.shape[:-1]
  points = _clip_to_unit_cube(points.reshape(-1, 3))  # [N, 3]
  # Per-axis [N] arrays keep the level loop free of strided [N, 3] slicing.
  coords = (points[:, 0], points[:, 1], points[:, 2])

  def encode_level(carry, level):
    table, resolution, resolution_uint, is_dense = level  # [T, F], scalars
    cells, fractions = zip(*(_cell_and_fraction(c, resolution) for c in coords))
    features = 0
    for corner in _CORNERS:
      x, y, z = (cell + np.uint32(upper) for cell, upper in zip(cells, corner))
      index = jnp.where(is_dense, dense_index(x, y, z, resolution_uint),
                        spatial_hash(x, y, z, spec.table_size))
      # In range by construction (hash mod T, dense index < (res+1)^3 <= T).
      corner_features = table.at[index].get(mode="promise_in_bounds")  # [N, F]
      weight = _corner_weight(fractions, corner)  # [N]
      features = features + weight[:, None] * corner_features
    return carry, features.astype(table.dtype)

  level_inputs = (tables,
                  np.asarray(spec.resolutions, points.dtype),
                  np.asarray(spec.resolutions, np.uint32),
                  np.asarray(spec.is_dense))
  _, features = jax.lax.scan(jax.checkpoint(encode_level), None,
                             level_inputs)  # [L, N, F]
  return features.transpose(1, 0, 2).reshape(
      *batch_shape, spec.num_output_features)


def encode_reference(points: jax.Array, tables: jax.Array,
                     spec: HashGridSpec) -> jax.Array:
  """Same result as `encode`, written straightforwardly: a Python loop over
  levels, one gather per corner, autodiff storing all residuals. The
  benchmark baseline and a second implementation for the tests.

  Args and returns as in `encode`.
  """
  _check_inputs(points, tables, spec)
  tables = jnp.asarray(tables)
  batch_shape = points.shape[:-1]
  points = _clip_to_unit_cube(points.reshape(-1, 3))  # [N, 3]
  level_features = []
  for level, (resolution, is_dense) in enumerate(
      zip(spec.resolutions, spec.is_dense)):
    cells, fractions = zip(*(_cell_and_fraction(points[:, axis], resolution)
                             for axis in range(3)))
    features = 0
    for corner in _CORNERS:
      x, y, z = (cell + np.uint32(upper) for cell, upper in zip(cells, corner))
      if is_dense:
        index = dense_index(x, y, z, np.uint32(resolution))
      else:
        index = spatial_hash(x, y, z, spec.table_size)
      features = features + (_corner_weight(fractions, corner)[:, None] *
                             tables[level][index])
    level_features.append(features.astype(tables.dtype))
  return jnp.concatenate(level_features, axis=-1).reshape(
      *batch_shape, spec.num_output_features)
