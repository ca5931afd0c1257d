"""The ATT3D train step, its optimizer and its state.

The jitted `train_step(state, batch, key) -> (state, metrics)`, for every
batch row (prompt_data.sample_batch):

  1. maps the row's text embedding (mixed over k prompts with Dirichlet
     weights when interpolation training is on; plus the CFG weight when the
     config amortizes over it) to hash-grid tables with the mapping network;
  2. renders V random views of that NeRF;
  3. follows the SDS gradient of the frozen text-to-image model, captioned
     with each view's label ("..., side view"), with classifier-free guidance;
     optionally plus a push of optim.opacity_penalty per pixel against opacity.

A non-finite loss or gradient skips the update inside the step (params and
optimizer state unchanged) and is counted. All randomness is
fold_in(key, state["step"]).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from att3d_jax.amortize import interpolation
from att3d_jax.amortize import model as model_lib
from att3d_jax.guidance import base as guidance_base
from att3d_jax.guidance import sds
from att3d_jax.nerf import cameras as cameras_lib

STATE_KEYS = ("step", "params", "stats", "opt_state", "nan_streak", "nan_total")


def learning_rate(config: ml_collections.ConfigDict, peak: float) -> optax.Schedule | float:
  """`peak`, or with optim.lr_final_fraction < 1 a cosine decay from `peak` to
  that fraction of it over train.num_steps (late steps only refine)."""
  final = config.optim.lr_final_fraction
  if final == 1.0:
    return peak
  if not 0.0 <= final <= 1.0:
    raise ValueError(f"optim.lr_final_fraction={final} must lie in [0, 1] (1 = constant)")
  return optax.cosine_decay_schedule(peak, config.train.num_steps, final)


def make_optimizer(config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """Adam with one learning rate for the mapping network, one for the field MLP,
  after optional global-norm clipping."""
  adam = functools.partial(optax.adam, b1=config.optim.b1, b2=config.optim.b2,
                           eps=config.optim.eps)
  labels = {name: jax.tree.map(lambda _, name=name: name, params[name]) for name in params}
  groups = optax.multi_transform(
      {"mapping": adam(learning_rate(config, config.optim.lr_mapping)),
       "mlp": adam(learning_rate(config, config.optim.lr_mlp)),
       "text_norm": optax.set_to_zero()}, labels)
  if config.optim.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), groups)
  return groups


def init_state(config: ml_collections.ConfigDict, model: model_lib.ATT3DModel,
               train_embeddings: np.ndarray) -> tuple[dict, optax.GradientTransformation]:
  """(fresh train state, its optimizer). The state is a dict of STATE_KEYS;
  train_embeddings [P, D] fix the mapping's input standardization."""
  params, stats = model.init(jax.random.fold_in(jax.random.key(config.seed), 0),
                             train_embeddings)
  optimizer = make_optimizer(config, params)
  state = {"step": jnp.int32(0), "params": params, "stats": stats,
           "opt_state": optimizer.init(params),
           "nan_streak": jnp.int32(0),  # consecutive skipped (non-finite) steps
           "nan_total": jnp.int32(0)}
  return state, optimizer


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _mask_per_prompt_rows(model: model_lib.ATT3DModel, updates: dict,
                          prompt_index: jax.Array) -> dict:
  """With a mapping of per-prompt rows, zero the updates of rows not rendered
  this step (Adam's momentum would move them otherwise)."""
  name = model.mapping.per_prompt_param
  if name is None:
    return updates
  rows = updates["mapping"][name]
  selected = jnp.zeros((rows.shape[0],), bool).at[prompt_index].set(True)
  selected = selected.reshape((-1,) + (1,) * (rows.ndim - 1))
  return {**updates, "mapping": {**updates["mapping"],
                                 name: jnp.where(selected, rows, 0.0)}}


def sample_row_cameras(config: ml_collections.ConfigDict, key: jax.Array,
                       rows: int) -> cameras_lib.Cameras:
  """config.batch.views_per_prompt random training cameras per row: batch shape [rows, V]."""
  return jax.vmap(lambda k: cameras_lib.sample_cameras(
      k, config.batch.views_per_prompt, config.camera.elevation_range_deg,
      config.camera.azimuth_range_deg, config.camera.distance_range,
      config.camera.fov_y_range_deg))(jax.random.split(key, rows))


def render_rows(config: ml_collections.ConfigDict, model: model_lib.ATT3DModel,
                background_color, mlp_params, tables, conditioning: jax.Array | None,
                cameras: cameras_lib.Cameras, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each row's NeRF (tables [B, ...], conditioning [B, D] or None) from its
  cameras [B, V] at config.camera's size -> rgb [B, V, H, W, 3], opacity [B, V, H, W]."""
  height, width = config.camera.height, config.camera.width

  def render_row(tables, conditioning, cameras, key):
    rays = cameras_lib.generate_rays(cameras, height, width)  # [V, H, W, 3]
    flat = cameras_lib.Rays(rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3))
    out = model.render_fn(mlp_params, tables, conditioning, key, background_color)(flat)
    views = cameras.azimuth.shape[0]
    return (out["rgb"].reshape(views, height, width, 3),
            out["opacity"].reshape(views, height, width))

  rows = cameras.azimuth.shape[0]
  return jax.vmap(render_row, in_axes=(0, 0 if conditioning is not None else None, 0, 0))(
      tables, conditioning, cameras, jax.random.split(key, rows))


def make_train_step(config: ml_collections.ConfigDict, model: model_lib.ATT3DModel,
                    guidance: guidance_base.Guidance, optimizer: optax.GradientTransformation):
  """The pure step `(state, batch, key) -> (state, metrics)`."""
  views = config.batch.views_per_prompt
  height, width = config.camera.height, config.camera.width
  loss_interpolation = config.interpolation.kind == "loss"
  opacity_penalty = config.optim.opacity_penalty

  def train_step(state, batch, key):
    step = state["step"]
    camera_key, render_key, sds_key = jax.random.split(jax.random.fold_in(key, step), 3)
    rows = batch["mapping_input"].shape[0]
    cameras = sample_row_cameras(config, camera_key, rows)  # batch shape [B, V]
    view = cameras_lib.view_index(cameras.elevation, cameras.azimuth)  # [B, V]
    text = jnp.take_along_axis(batch["conditioning"], view[:, None, :, None, None],
                               axis=2)  # [B, k, V, L, D]
    loss_weights = batch["alpha"]  # [B, k]
    if not loss_interpolation:  # latent interpolation: one mixed caption per view
      text = interpolation.mix_embeddings(text, loss_weights)[:, None]
      loss_weights = jnp.ones((rows, 1), jnp.float32)
    k = text.shape[1]
    t_range = sds.annealed_t_range(config.guidance.t_range, config.guidance.t_max_final,
                                   step / config.train.num_steps)

    def loss_fn(params):
      mapped, stats = model.apply_mapping(params, state["stats"], batch["mapping_input"],
                                          batch["prompt_index"], update_stats=True)
      images, opacity = render_rows(config, model, guidance.background_color, params["mlp"],
                                    mapped.tables, mapped.conditioning, cameras,
                                    render_key)  # [B, V, H, W, 3], [B, V, H, W]
      x = guidance.model_input(images.reshape((rows * views, height, width, 3)))
      x = jnp.broadcast_to(x.reshape((rows, 1, views) + x.shape[1:]),
                           (rows, k, views) + x.shape[1:])
      scale = jnp.broadcast_to(batch["guidance_scale"][:, None, None], (rows, k, views))
      _, aux = sds.sds_loss(guidance.eps_fn, x.reshape((-1,) + x.shape[3:]), sds_key,
                            text.reshape((-1,) + text.shape[3:]), guidance.uncond,
                            alphas_cumprod=guidance.alphas_cumprod,
                            guidance_scale=scale.reshape(-1), t_range=t_range,
                            weighting=config.guidance.weighting,
                            guidance_interval=tuple(config.guidance.get("interval", (0.0, 1.0))))
      per_prompt_loss = aux["loss_per_sample"].reshape(rows, k, views).sum(-1)
      loss = jnp.mean(interpolation.mix_losses(per_prompt_loss, loss_weights))
      if opacity_penalty:
        # Sparsity: SDS pays nothing for density colored like the background,
        # this pays opacity_penalty per opaque pixel (per row, as the SDS sum).
        loss = loss + opacity_penalty * jnp.sum(opacity) / rows
      return loss, (aux, stats, images)

    (loss, (aux, stats, images)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    updates = _mask_per_prompt_rows(model, updates, batch["prompt_index"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "step": step + 1,
        "params": keep_new(params, state["params"]),
        "stats": keep_new(stats, state["stats"]),
        "opt_state": keep_new(opt_state, state["opt_state"]),
        "nan_streak": jnp.where(finite, 0, state["nan_streak"] + 1),
        "nan_total": state["nan_total"] + jnp.where(finite, 0, 1),
    }
    metrics = {
        "sds_grad_norm": jnp.mean(aux["grad_norm"]),
        "guidance_rms": jnp.mean(aux["guidance_rms"]),
        "cond_error_rms": jnp.mean(aux["cond_error_rms"]),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(new_state["params"]),
        "t_max": t_range[1],
        "guidance_scale": jnp.mean(batch["guidance_scale"]),  # the CFG weight (mean of rows)
        "finite": finite,
        "opacity_mean": jnp.mean(jnp.linalg.norm(
            images - jnp.asarray(guidance.background_color), axis=-1) > 0.1),
    }
    return new_state, metrics

  return train_step
