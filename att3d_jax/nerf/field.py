"""The NeRF field: hash-grid features -> shared small MLP -> density, albedo.

(Another point encoding, e.g. amortize/triplane.py's triplanes, plugs in
through `field_outputs`'s `encode`.)

The grid `tables` are an argument, not module parameters, so that ATT3D's
mapping network can emit them per prompt (and the per-prompt baseline can
`vmap` over a leading prompt axis of free tables). Only the small decoder MLP
(`FieldMLP`) is shared. For the concatenation baseline of ATT3D, an optional
per-prompt `conditioning` vector is appended to the MLP input.

Density = activation(raw_density + blob bias) with ATT3D's bias
`10 * (1 - 2 |x|)` (`density_bias` with scale 10, radius 0.5), which starts
training from a ball at the origin. Normals (exported turntables) are the
analytic negative, normalized gradient of the density through the hash grid.

World points live in the scene sphere of `scene_radius`; the grid covers the
cube [-scene_radius, scene_radius]^3, mapped to [0, 1]^3.
"""

from typing import Any, Callable, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from att3d_jax.nerf import hashgrid
from att3d_jax.nerf import render

DENSITY_ACTIVATIONS = ("softplus", "trunc_exp")
# torch-ngp clamps the exponent of trunc_exp's derivative at 15.
TRUNC_EXP_MAX_EXPONENT = 15.0


@jax.custom_jvp
def trunc_exp(x: jax.Array) -> jax.Array:
  """exp(x) whose derivative is exp(min(x, 15)) (torch-ngp's trunc_exp), so
  that a large raw density cannot produce an exploding gradient."""
  return jnp.exp(x)


@trunc_exp.defjvp
def _trunc_exp_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return jnp.exp(x), jnp.exp(jnp.minimum(x, TRUNC_EXP_MAX_EXPONENT)) * x_dot


def density_bias(points: jax.Array, scale: float = 10.0,
                 radius: float = 0.5) -> jax.Array:
  """ATT3D's density blob `scale * (1 - |x| / radius)`: positive inside the
  ball of `radius`, negative outside.

  Args:
    points: `[N, 3]` world coordinates.

  Returns:
    bias: `[N]`. Its gradient is defined (zero) at the origin.
  """
  squared = jnp.sum(points * points, axis=-1)
  # sqrt(max(., tiny)) instead of a norm: the norm's gradient is NaN at 0.
  norm = jnp.sqrt(jnp.maximum(squared, jnp.finfo(points.dtype).tiny))
  return scale * (1.0 - norm / radius)


class FieldMLP(nn.Module):
  """Shared decoder: features `[N, D]` -> raw outputs `[N, 4]` = (raw density,
  raw albedo rgb), both before their activations."""

  hidden_width: int = 64
  num_hidden_layers: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    chex.assert_rank(features, 2)
    x = features.astype(self.dtype)
    for layer in range(self.num_hidden_layers):
      x = nn.relu(nn.Dense(self.hidden_width, dtype=self.dtype,
                           name=f"hidden_{layer}")(x))
    return nn.Dense(4, dtype=self.dtype, name="output")(x)


def init_mlp_params(key: jax.Array, mlp: FieldMLP, spec: Optional[hashgrid.HashGridSpec],
                    conditioning_dim: int = 0, *, feature_dim: Optional[int] = None) -> dict:
  """The "params" collection of `mlp` for point features plus an optional
  conditioning vector of `conditioning_dim` entries. The point features are
  the hash grid's of `spec` (L * F), or `feature_dim` wide when given (another
  encoding, e.g. a triplane; then spec may be None)."""
  if feature_dim is None:
    feature_dim = spec.num_output_features
  features = jnp.zeros((1, feature_dim + conditioning_dim), jnp.float32)
  return mlp.init(key, features)["params"]


def field_outputs(mlp_params: dict, tables, points: jax.Array,
                  spec: Optional[hashgrid.HashGridSpec] = None, *, mlp: FieldMLP,
                  scene_radius: float = 1.0, density_activation: str = "softplus",
                  bias_scale: float = 10.0, bias_radius: float = 0.5,
                  conditioning: Optional[jax.Array] = None,
                  compute_normals: bool = False,
                  encode: Optional[Callable[[Any, jax.Array], jax.Array]] = None
                  ) -> dict[str, jax.Array]:
  """Density, albedo and optionally normals of the field at world points.

  For `render.render_rays`, close over everything but the points, e.g.
  `functools.partial(field_outputs, mlp_params, tables, spec=spec, mlp=mlp)`.

  Args:
    mlp_params: the "params" collection of `mlp`.
    tables: one prompt's field parameters: hash-grid tables `spec.table_shape`
      = `[L, T, F]`, or whatever `encode` reads.
    points: `[N, 3]` world coordinates; the grid covers
      [-scene_radius, scene_radius]^3 (outside, features are clamped).
    spec: the grid's static hyperparameters (unused when `encode` is given).
    mlp: the shared `FieldMLP`.
    scene_radius: half the side of the cube the grid covers.
    density_activation: "softplus" or "trunc_exp", applied to raw density +
      bias.
    bias_scale, bias_radius: the density blob, see `density_bias`.
    conditioning: optional `[C]` (shared by all points) or `[N, C]` vector
      appended to the grid features; the MLP must have been initialized for
      `L * F + C` inputs (`init_mlp_params(..., conditioning_dim=C)`).
    compute_normals: also return normals (one extra backward pass).
    encode: `(tables, unit_points [N, 3] in [0, 1]^3) -> features [N, F']`,
      how a generator other than the hash grid encodes points (the mapping
      network's `encode`); None: `hashgrid.encode` with `spec`.

  Returns:
    dict with density `[N]` (>= 0), albedo `[N, 3]` in [0, 1], and, with
    compute_normals, normal `[N, 3]`: `-normalize(d density / d x)`, unit and
    pointing out of the object.
  """
  if density_activation not in DENSITY_ACTIVATIONS:
    raise ValueError(f"unknown density_activation {density_activation!r}; expected "
                     f"one of {DENSITY_ACTIVATIONS}")
  if encode is None:
    if spec is None:
      raise ValueError("field_outputs needs the hash grid's spec or an encode function.")
    encode = lambda tables, unit_points: hashgrid.encode(unit_points, tables, spec)
  chex.assert_rank(points, 2)
  chex.assert_axis_dimension(points, -1, 3)
  num_points = points.shape[0]
  if conditioning is not None:
    if conditioning.ndim == 1:
      conditioning = jnp.broadcast_to(conditioning, (num_points,) + conditioning.shape)
    chex.assert_rank(conditioning, 2)
    chex.assert_axis_dimension(conditioning, 0, num_points)

  def raw_density_and_albedo(points):
    unit_points = 0.5 * (points / scene_radius + 1.0)
    features = encode(tables, unit_points)
    if conditioning is not None:
      features = jnp.concatenate([features, conditioning.astype(features.dtype)],
                                 axis=-1)
    raw = mlp.apply({"params": mlp_params}, features)
    raw_density = raw[:, 0] + density_bias(points, bias_scale, bias_radius)
    return raw_density, raw[:, 1:]

  if compute_normals:
    # Each point's density depends only on that point, so one vector-Jacobian
    # product with ones gives every point's gradient. The gradient is taken
    # before the activation: both activations are increasing, so the
    # direction is the same, and it does not vanish where softplus saturates.
    raw_density, vjp_fn, raw_albedo = jax.vjp(raw_density_and_albedo, points,
                                              has_aux=True)
    (gradient,) = vjp_fn(jnp.ones_like(raw_density))
  else:
    raw_density, raw_albedo = raw_density_and_albedo(points)

  activation = jax.nn.softplus if density_activation == "softplus" else trunc_exp
  out = {"density": activation(raw_density), "albedo": jax.nn.sigmoid(raw_albedo)}
  if compute_normals:
    out["normal"] = -render.safe_normalize(gradient)
  return out
