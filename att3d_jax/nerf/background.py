"""The background seen through the transparent part of each ray.

`render.render_rays` takes a `background_fn(directions [num_rays, 3]) -> rgb
[num_rays, 3]`; the models here composite over one solid color, the guidance
model's background (`Guidance.background_color`):
`functools.partial(solid_background, color)`.
"""

from typing import Sequence

import chex
import jax
import jax.numpy as jnp


def solid_background(color: Sequence[float] | jax.Array,
                     directions: jax.Array) -> jax.Array:
  """`color [3]` broadcast to `[num_rays, 3]` like `directions`."""
  color = jnp.asarray(color, directions.dtype)
  chex.assert_shape(color, (3,))
  return jnp.broadcast_to(color, directions.shape)
