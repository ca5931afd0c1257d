"""What training needs from a frozen text-to-image model, and where kinds register.

A guidance model is any loader `config -> Guidance` registered under a
config.guidance.kind:

    @base.register("mykind")
    def load_guidance(config) -> base.Guidance: ...

`load(config)` finds the loader of config.guidance.kind. The modules that
register kinds are listed once, in `att3d_jax/build.py` (GUIDANCE_MODULES),
which imports them before the first lookup.
"""

from typing import Callable, NamedTuple

import jax
import ml_collections
import numpy as np

from att3d_jax.guidance import schedule


class Guidance(NamedTuple):
  """A frozen text-to-image diffusion model as the train step sees it."""

  eps_fn: schedule.EpsFn  # (noisy [N, C, h, w], t [N], text [N, L, D]) -> eps
  alphas_cumprod: jax.Array  # [num_train_timesteps]
  uncond: jax.Array  # [1, L, D] the empty caption's conditioning
  model_input: Callable[[jax.Array], jax.Array]  # renders [N, H, W, 3] -> x [N, C, h, w]
  encode: Callable[[list[str]], np.ndarray]  # captions -> conditioning [N, L, D]
  embed: Callable[[list[str]], np.ndarray]  # prompts -> mapping embedding [N, D]
  background_color: tuple[float, float, float]  # what renders are composited on


Loader = Callable[[ml_collections.ConfigDict], Guidance]
_LOADERS: dict[str, Loader] = {}


def register(*kinds: str) -> Callable[[Loader], Loader]:
  """Decorator: the loader serves config.guidance.kind in `kinds`."""

  def decorate(loader: Loader) -> Loader:
    for kind in kinds:
      if kind in _LOADERS and _LOADERS[kind] is not loader:
        raise ValueError(f"guidance kind {kind!r} is registered twice")
      _LOADERS[kind] = loader
    return loader

  return decorate


def kinds() -> tuple[str, ...]:
  return tuple(sorted(_LOADERS))


def load(config: ml_collections.ConfigDict) -> Guidance:
  """The guidance model named by config.guidance.kind."""
  kind = config.guidance.kind
  if kind not in _LOADERS:
    raise ValueError(f"unknown --config.guidance.kind={kind!r}; registered kinds: "
                     f"{kinds()}")
  return _LOADERS[kind](config)
