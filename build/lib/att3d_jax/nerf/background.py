"""Backgrounds seen through the transparent part of each ray.

`render.render_rays` takes a `background_fn(directions [num_rays, 3]) -> rgb
[num_rays, 3]`; build one with `functools.partial(background_rgb, kind, ...)`:
  * "mlp": a small learned environment map on the view direction
    (`BackgroundMLP`; DreamFusion's background network, threestudio's
    neural-environment-map background), trained with the field;
  * "solid": one fixed color (e.g. white for evaluation renders);
  * "random": one uniformly random color per call (per image), a
    regularizer against the field painting its own background.
"""

from typing import Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

BACKGROUND_KINDS = ("mlp", "solid", "random")


def direction_encoding(directions: jax.Array, num_frequencies: int) -> jax.Array:
  """`[..., 3]` -> `[..., 3 + 6 * num_frequencies]`: the direction and
  sin / cos of `2^k * pi * direction` for k < num_frequencies (NeRF's
  positional encoding; few frequencies keep the environment smooth)."""
  scales = jnp.pi * 2.0 ** jnp.arange(num_frequencies, dtype=directions.dtype)
  angles = (directions[..., None, :] * scales[:, None]).reshape(
      directions.shape[:-1] + (3 * num_frequencies,))
  return jnp.concatenate([directions, jnp.sin(angles), jnp.cos(angles)], axis=-1)


class BackgroundMLP(nn.Module):
  """View direction -> background rgb in (0, 1)."""

  hidden_width: int = 32
  num_hidden_layers: int = 2
  num_frequencies: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, directions: jax.Array) -> jax.Array:
    """directions: `[num_rays, 3]` unit -> rgb `[num_rays, 3]`."""
    chex.assert_rank(directions, 2)
    x = direction_encoding(directions.astype(self.dtype), self.num_frequencies)
    for layer in range(self.num_hidden_layers):
      x = nn.relu(nn.Dense(self.hidden_width, dtype=self.dtype,
                           name=f"hidden_{layer}")(x))
    return nn.sigmoid(nn.Dense(3, dtype=self.dtype, name="output")(x))


def solid_background(color: Sequence[float] | jax.Array,
                     directions: jax.Array) -> jax.Array:
  """`color [3]` broadcast to `[num_rays, 3]` like `directions`."""
  color = jnp.asarray(color, directions.dtype)
  chex.assert_shape(color, (3,))
  return jnp.broadcast_to(color, directions.shape)


def random_background(key: jax.Array, directions: jax.Array) -> jax.Array:
  """One color uniform in [0, 1]^3, shared by all rays: `[num_rays, 3]`."""
  return solid_background(jax.random.uniform(key, (3,), directions.dtype),
                          directions)


def background_rgb(kind: str, directions: jax.Array, *,
                   mlp: Optional[BackgroundMLP] = None,
                   params: Optional[dict] = None,
                   color: Sequence[float] = (1.0, 1.0, 1.0),
                   key: Optional[jax.Array] = None) -> jax.Array:
  """Background color of each ray.

  Args:
    kind: one of BACKGROUND_KINDS.
    directions: `[num_rays, 3]` unit ray directions.
    mlp, params: the `BackgroundMLP` and its "params" collection (kind "mlp").
    color: rgb in [0, 1] (kind "solid").
    key: PRNG key (kind "random").

  Returns:
    rgb: `[num_rays, 3]`.
  """
  if kind == "mlp":
    if mlp is None or params is None:
      raise ValueError("background kind 'mlp' needs mlp= (a BackgroundMLP) and "
                       f"params=; got mlp={mlp}, params is None: {params is None}")
    return mlp.apply({"params": params}, directions)
  if kind == "solid":
    return solid_background(color, directions)
  if kind == "random":
    if key is None:
      raise ValueError("background kind 'random' needs key=, got None")
    return random_background(key, directions)
  raise ValueError(f"unknown background kind {kind!r}; expected one of "
                   f"{BACKGROUND_KINDS}")
