"""A NeRF as the configs describe it: grid tables + shared MLP -> render function.

Binds the pure functions of field.py and render.py to a config's `field` and
`render` sections, so that every experiment renders a given set of
parameters the same way.
"""

import functools
from typing import Callable, Optional, Sequence

import jax
import ml_collections

from att3d_jax.nerf import background as background_lib
from att3d_jax.nerf import field as field_lib
from att3d_jax.nerf import hashgrid
from att3d_jax.nerf import render as render_lib
from att3d_jax.nerf.cameras import Rays


def grid_spec(config: ml_collections.ConfigDict) -> hashgrid.HashGridSpec:
  """The static hash-grid spec of `config.hashgrid`."""
  return hashgrid.HashGridSpec(**config.hashgrid.to_dict())


def field_mlp(config: ml_collections.ConfigDict) -> field_lib.FieldMLP:
  return field_lib.FieldMLP(config.field.hidden_width, config.field.num_hidden_layers)


def field_fn(params: dict, spec: hashgrid.HashGridSpec, mlp: field_lib.FieldMLP,
             config: ml_collections.ConfigDict,
             compute_normals: bool = False) -> render_lib.FieldFn:
  """points [N, 3] -> dict(density, albedo[, normal]) of one NeRF.

  Args:
    params: {"tables": [L, T, F], "mlp": FieldMLP params}.
  """
  return functools.partial(
      field_lib.field_outputs, params["mlp"], params["tables"], spec=spec, mlp=mlp,
      scene_radius=config.render.scene_radius,
      density_activation=config.field.density_activation,
      bias_scale=config.field.bias_scale, bias_radius=config.field.bias_radius,
      compute_normals=compute_normals)


def render_fn(params: dict, spec: hashgrid.HashGridSpec, mlp: field_lib.FieldMLP,
              config: ml_collections.ConfigDict, key: Optional[jax.Array] = None, *,
              background_color: Sequence[float]) -> Callable[[Rays], dict]:
  """Rays [N, 3] -> `render.render_rays` outputs, over a solid background,
  with `config.render`'s sampling and albedo shading; `key=None` renders
  deterministically (evaluation)."""
  if config.render.shading != "albedo":
    raise ValueError(f"render_fn renders albedo shading only; config.render.shading is "
                     f"{config.render.shading!r}")
  background_fn = functools.partial(background_lib.background_rgb, "solid",
                                    color=background_color)
  return lambda rays: render_lib.render_rays(
      field_fn(params, spec, mlp, config), rays, key,
      num_samples=config.render.num_samples, scene_radius=config.render.scene_radius,
      background_fn=background_fn, shading="albedo",
      num_importance=config.render.num_importance,
      num_proposal=config.render.num_proposal)


def init_params(key: jax.Array, spec: hashgrid.HashGridSpec,
                mlp: field_lib.FieldMLP) -> dict:
  """{"tables": [L, T, F], "mlp": params} of one freshly initialized NeRF."""
  table_key, mlp_key = jax.random.split(key)
  return {"tables": hashgrid.init_tables(table_key, spec),
          "mlp": field_lib.init_mlp_params(mlp_key, mlp, spec)}
