r"""ATT3D amortized training: one model, many prompts, score distillation.

Each step draws B prompts (rows) on the host from `(seed, step)` alone, so
the data order is a pure function of the step and a resumed run sees exactly
what an uninterrupted one would. The jitted `train_step(state, batch, key)`
then, for every row:

  1. maps the row's text embedding (mixed over k prompts with Dirichlet
     weights when interpolation training is on; plus the CFG weight when the
     config amortizes over it) to hash-grid tables with the mapping network;
  2. renders V random views of that NeRF (albedo, solid world background);
  3. follows the SDS gradient of the frozen text-to-image model, captioned
     with each view's label ("..., side view"), with classifier-free guidance.

The batch axis is sharded over the mesh axis "data" of all devices, on every
host (config.train.distributed); parameters are replicated, except that with
config.train.model_parallelism > 1 a second axis "model" splits the
hypernetwork's output layer and its optimizer state (`state_shardings`). Every process
builds the same global batch and `jax.device_put` keeps its own rows; only
process 0 writes logs, samples and outputs (orbax coordinates checkpoints). A
non-finite loss or gradient skips the update inside the step (params and
optimizer state unchanged) and is counted.

Compute is counted like ATT3D: rendered frames per training prompt,
step * B * V / num_train_prompts.
"""

import functools
import json
import os
import pathlib
import signal
import time
from typing import Callable, NamedTuple, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from att3d_jax import names
from att3d_jax import tensorboard
from att3d_jax.amortize import interpolation
from att3d_jax.amortize import model as model_lib
from att3d_jax.eval import shapes_eval
from att3d_jax.guidance import schedule
from att3d_jax.guidance import sds
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.nerf import mesh as mesh_lib
from att3d_jax.nerf import render as render_lib
from att3d_jax.nerf import turntable
from att3d_jax.shapes import prompt_sets
from att3d_jax.shapes import scenes

NUM_VIEWS = len(cameras_lib.VIEW_LABELS)
INTERPOLATION_KINDS = ("none", "embedding", "loss")
CHECKPOINT_DIR = "checkpoints"
STATE_KEYS = ("step", "params", "stats", "opt_state", "nan_streak", "nan_total")


# ---------------------------------------------------------------------------
# The frozen guidance model and the text tables.


class Guidance(NamedTuple):
  """What training needs from a frozen text-to-image diffusion model."""

  eps_fn: schedule.EpsFn  # (noisy [N, C, h, w], t [N], text [N, L, D]) -> eps
  alphas_cumprod: jax.Array  # [num_train_timesteps]
  uncond: jax.Array  # [1, L, D] the empty caption's conditioning
  model_input: Callable[[jax.Array], jax.Array]  # renders [N, H, W, 3] -> x [N, C, h, w]
  encode: Callable[[list[str]], np.ndarray]  # captions -> conditioning [N, L, D]
  embed: Callable[[list[str]], np.ndarray]  # prompts -> mapping embedding [N, D]
  background_color: tuple[float, float, float]  # what renders are composited on


def load_guidance(config: ml_collections.ConfigDict) -> Guidance:
  """The guidance model named by config.guidance.kind, from config.guidance.path."""
  kind = config.guidance.kind
  if kind == "shapes":
    from att3d_jax.shapes import diffusion  # pylint: disable=g-import-not-at-top
    try:
      model = diffusion.ShapesDiffusionModel(config.guidance.path)
    except FileNotFoundError as error:
      raise FileNotFoundError(f"--config.guidance.path={config.guidance.path!r}: "
                              f"{error}") from error
    conditioning = lambda captions: np.asarray(model.conditioning(captions))
    return Guidance(
        eps_fn=model.eps_fn(), alphas_cumprod=model.alphas_cumprod,
        uncond=jnp.zeros((1, 1 + model.encoder.max_length, model.encoder.width)),
        model_input=sds.pixel_model_input,
        encode=conditioning,
        # The pooled sentence embedding (row 0 of the packed conditioning).
        embed=lambda prompts: conditioning(prompts)[:, 0],
        background_color=scenes.BACKGROUND_RGB)
  if kind in ("if", "sd"):
    from att3d_jax.guidance import real  # pylint: disable=g-import-not-at-top
    return real.load_guidance(config)
  raise ValueError(f"unknown guidance kind {kind!r}; expected 'shapes', 'if' or 'sd'")


class PromptTables(NamedTuple):
  """Host-side text tables of a prompt list."""

  prompts: list[str]
  embedding: np.ndarray  # [P, D] float32, the mapping network's text input
  conditioning: np.ndarray  # [P, NUM_VIEWS, L, D] float16, one per view caption


def prompt_tables(guidance: Guidance, prompts: list[str]) -> PromptTables:
  if not prompts:
    raise ValueError("empty prompt list")
  captions = [p + cameras_lib.view_suffix(v) for p in prompts for v in cameras_lib.VIEW_LABELS]
  conditioning = guidance.encode(captions).astype(np.float16)
  conditioning = conditioning.reshape((len(prompts), NUM_VIEWS) + conditioning.shape[1:])
  return PromptTables(list(prompts), guidance.embed(list(prompts)).astype(np.float32),
                      conditioning)


def load_prompts(config: ml_collections.ConfigDict) -> prompt_sets.PromptSet:
  """The config's prompt set: a shapes-world set, or a real one (DF27, Pig64, animals)."""
  if config.prompts.set in prompt_sets.PROMPT_SETS:
    return prompt_sets.load_prompt_set(config.prompts.set, config.prompts.split)
  from att3d_jax import real_prompts  # pylint: disable=g-import-not-at-top
  if config.prompts.set in real_prompts.PROMPT_SETS:
    return real_prompts.load_prompt_set(config.prompts.set, config.prompts.split)
  raise ValueError(f"unknown prompt set {config.prompts.set!r}; available: "
                   f"{list(prompt_sets.PROMPT_SETS) + list(real_prompts.PROMPT_SETS)}")


# ---------------------------------------------------------------------------
# Batches: a pure function of (seed, step).


def num_mixed(config: ml_collections.ConfigDict) -> int:
  """k: prompts per batch row (1 without interpolation training)."""
  kind = config.interpolation.kind
  if kind not in INTERPOLATION_KINDS:
    raise ValueError(f"unknown interpolation kind {kind!r}; expected one of "
                     f"{INTERPOLATION_KINDS}")
  if kind != "none" and config.mapping.kind == "per_prompt":
    raise ValueError("interpolation training needs a mapping network that reads the "
                     "embedding; mapping.kind 'per_prompt' ignores it")
  return 1 if kind == "none" else config.interpolation.num_prompts


def scale_column(config: ml_collections.ConfigDict, scale: np.ndarray) -> np.ndarray:
  """The CFG weight as the mapping's extra input, mapped to [0, 1] over its range."""
  low, high = config.guidance.scale_range
  return ((scale - low) / max(high - low, 1e-6)).astype(np.float32)


def mapping_inputs(config: ml_collections.ConfigDict, embedding: np.ndarray,
                   scale: Optional[np.ndarray] = None) -> np.ndarray:
  """embedding [N, D] (+ CFG weight [N] when amortized) -> mapping input [N, D(+1)]."""
  if not config.guidance.amortize_scale:
    return embedding.astype(np.float32)
  if scale is None:
    scale = np.full((len(embedding),), config.guidance.scale, np.float32)
  return np.concatenate([embedding, scale_column(config, scale)[:, None]], axis=1)


def sample_batch(config: ml_collections.ConfigDict, tables: PromptTables, step: int) -> dict:
  """The batch of `step`: B rows of k prompts each, drawn from (seed, step) alone.

  Returns numpy arrays:
    prompt_index [B] int32: each row's first prompt (per_prompt grids use it);
    mapping_input [B, D(+1)]: alpha-mixed embedding (+ the CFG weight column);
    alpha [B, k]: mixing weights, one-hot for rows without interpolation;
    conditioning [B, k, NUM_VIEWS, L, D] float32;
    guidance_scale [B] float32.
  """
  rng = np.random.default_rng([config.seed, step])
  rows, k = config.batch.prompts_per_step, num_mixed(config)
  index = rng.integers(0, len(tables.prompts), (rows, k))
  alpha = np.zeros((rows, k), np.float32)
  alpha[:, 0] = 1.0
  if k > 1:
    mixed = rng.random(rows) < config.interpolation.fraction
    weights = rng.dirichlet(np.full(k, config.interpolation.kappa), rows).astype(np.float32)
    alpha = np.where(mixed[:, None], weights, alpha)
  if config.guidance.amortize_scale:
    low, high = config.guidance.scale_range
    scale = rng.uniform(low, high, rows).astype(np.float32)
  else:
    scale = np.full((rows,), config.guidance.scale, np.float32)
  embedding = np.einsum("bk,bkd->bd", alpha, tables.embedding[index])
  return {"prompt_index": index[:, 0].astype(np.int32),
          "mapping_input": mapping_inputs(config, embedding, scale),
          "alpha": alpha,
          "conditioning": tables.conditioning[index].astype(np.float32),
          "guidance_scale": scale}


# ---------------------------------------------------------------------------
# Train state, optimizer and step.


def make_optimizer(config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """Adam with one learning rate for the mapping network, one for the field MLP,
  after optional global-norm clipping."""
  adam = functools.partial(optax.adam, b1=config.optim.b1, b2=config.optim.b2,
                           eps=config.optim.eps)
  labels = {name: jax.tree.map(lambda _, name=name: name, params[name]) for name in params}
  groups = optax.multi_transform({"mapping": adam(config.optim.lr_mapping),
                                  "mlp": adam(config.optim.lr_mlp),
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


def make_train_step(config: ml_collections.ConfigDict, model: model_lib.ATT3DModel,
                    guidance: Guidance, optimizer: optax.GradientTransformation,
                    poison_step: int = -1):
  """The pure step `(state, batch, key) -> (state, metrics)`; all randomness
  is fold_in(key, state["step"]). `poison_step` (tests) makes that step's
  loss NaN, to exercise the guard."""
  views = config.batch.views_per_prompt
  height, width = config.camera.height, config.camera.width
  loss_interpolation = config.interpolation.kind == "loss"
  per_prompt = config.mapping.kind == "per_prompt"

  def render_row(mlp_params, tables, conditioning, cameras, key):
    rays = cameras_lib.generate_rays(cameras, height, width)  # [V, H, W, 3]
    flat = cameras_lib.Rays(rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3))
    out = model.render_fn(mlp_params, tables, conditioning, key,
                          guidance.background_color)(flat)
    return out["rgb"].reshape(views, height, width, 3)

  def train_step(state, batch, key):
    step = state["step"]
    camera_key, render_key, sds_key = jax.random.split(jax.random.fold_in(key, step), 3)
    rows = batch["mapping_input"].shape[0]
    cameras = jax.vmap(lambda k: cameras_lib.sample_cameras(
        k, views, config.camera.elevation_range_deg, config.camera.azimuth_range_deg,
        config.camera.distance_range, config.camera.fov_y_range_deg))(
            jax.random.split(camera_key, rows))  # batch shape [B, V]
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
      conditioning = mapped.conditioning
      images = jax.vmap(render_row, in_axes=(None, 0, 0 if conditioning is not None else None,
                                             0, 0))(
          params["mlp"], mapped.tables, conditioning, cameras,
          jax.random.split(render_key, rows))  # [B, V, H, W, 3]
      x = guidance.model_input(images.reshape((rows * views, height, width, 3)))
      x = jnp.broadcast_to(x.reshape((rows, 1, views) + x.shape[1:]),
                           (rows, k, views) + x.shape[1:])
      scale = jnp.broadcast_to(batch["guidance_scale"][:, None, None], (rows, k, views))
      _, aux = sds.sds_loss(guidance.eps_fn, x.reshape((-1,) + x.shape[3:]), sds_key,
                            text.reshape((-1,) + text.shape[3:]), guidance.uncond,
                            alphas_cumprod=guidance.alphas_cumprod,
                            guidance_scale=scale.reshape(-1), t_range=t_range,
                            weighting=config.guidance.weighting)
      per_prompt_loss = aux["loss_per_sample"].reshape(rows, k, views).sum(-1)
      loss = jnp.mean(interpolation.mix_losses(per_prompt_loss, loss_weights))
      loss = jnp.where(step == poison_step, jnp.nan, loss)
      return loss, (aux, stats, images)

    (loss, (aux, stats, images)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    if per_prompt:  # only the grids rendered this step move
      selected = jnp.zeros((updates["mapping"]["tables"].shape[0],), bool)
      selected = selected.at[batch["prompt_index"]].set(True)
      updates["mapping"]["tables"] = jnp.where(selected[:, None, None, None],
                                               updates["mapping"]["tables"], 0.0)
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
        "finite": finite,
        "opacity_mean": jnp.mean(jnp.linalg.norm(
            images - jnp.asarray(guidance.background_color), axis=-1) > 0.1),
    }
    return new_state, metrics

  return train_step


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


# State leaves at least this wide are split over the mesh's "model" axis (last
# dimension): the hypernetwork's output layer, its Adam moments and spectral
# state, which grow with the hash grid (hidden_width x L * T * F).
MIN_SHARDED_WIDTH = 4096


def state_shardings(state, mesh: Mesh):
  """NamedSharding per state leaf: replicated, except leaves of width >=
  MIN_SHARDED_WIDTH (divisible by the "model" axis) split on their last
  dimension when the mesh has a "model" axis of size > 1."""
  model_size = dict(mesh.shape).get("model", 1)

  def sharding(leaf):
    shape = getattr(leaf, "shape", ())
    if (model_size > 1 and len(shape) >= 1 and shape[-1] >= MIN_SHARDED_WIDTH
        and shape[-1] % model_size == 0):
      return NamedSharding(mesh, PartitionSpec(*([None] * (len(shape) - 1)), "model"))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(sharding, state)


def place_state(state, mesh: Mesh):
  """Commits the train state to the mesh with `state_shardings`, as the train
  step returns it (an uncommitted input would compile the step a second time)."""
  return jax.device_put(state, state_shardings(state, mesh))


def jit_train_step(train_step, mesh: Mesh, state):
  """jit with the batch sharded over the mesh's "data" axis and the state laid
  out by `state_shardings` (`state` gives the shapes); the state is donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = state_shardings(state, mesh)
  return jax.jit(train_step, in_shardings=(shardings, data_sharding(mesh), replicated),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` for config.train.distributed, before
  anything touches a device. On TPU pods, SLURM, Open MPI and Kubernetes JAX
  finds the coordinator and this process's id itself; elsewhere (several
  processes on one machine, say) set JAX_COORDINATOR_ADDRESS=host:port,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process's environment."""
  num_processes, process_id = (os.environ.get(name) for name in ("JAX_NUM_PROCESSES",
                                                                 "JAX_PROCESS_ID"))
  jax.distributed.initialize(num_processes=int(num_processes) if num_processes else None,
                             process_id=int(process_id) if process_id else None)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The device mesh over every device of every process: axis "data" (the
  batch's prompt rows), and with config.train.model_parallelism = m > 1 a
  second axis "model" of size m over which the hypernetwork's output layer is
  split (see `state_shardings`)."""
  devices = np.asarray(jax.devices())
  model_size = config.train.model_parallelism
  if model_size < 1 or len(devices) % model_size:
    raise ValueError(f"train.model_parallelism={model_size} must divide the "
                     f"{len(devices)} devices")
  data_size = len(devices) // model_size
  if config.batch.prompts_per_step % data_size:
    raise ValueError(f"batch.prompts_per_step={config.batch.prompts_per_step} must be a "
                     f"multiple of the {data_size} devices the batch is sharded over")
  if model_size == 1:
    return Mesh(devices, ("data",))
  return Mesh(devices.reshape(data_size, model_size), ("data", "model"))


def frames_per_prompt(config: ml_collections.ConfigDict, step: int, num_prompts: int) -> float:
  """ATT3D's compute axis: rendered frames per training prompt after `step` steps."""
  return step * config.batch.prompts_per_step * config.batch.views_per_prompt / num_prompts


# ---------------------------------------------------------------------------
# Rendering and evaluation of trained models.


def make_render_prompts(model: model_lib.ATT3DModel, background_color, height: int,
                        width: int, chunk: int = 8):
  """jitted (params, stats, mapping_input [P, Din], prompt_index [P], cameras
  [V]) -> dict rgb [P, V, H, W, 3], opacity [P, V, H, W]; `chunk` prompts per call."""

  @jax.jit
  def render_chunk(params, stats, inputs, index, cameras):
    mapped, _ = model.apply_mapping(params, stats, inputs, index)
    conditioning = mapped.conditioning

    def one(tables, cond):
      out = render_lib.render_images(
          model.render_fn(params["mlp"], tables, cond, None, background_color),
          cameras, height, width)
      return {"rgb": out["rgb"], "opacity": out["opacity"]}

    if conditioning is None:
      return jax.vmap(lambda t: one(t, None))(mapped.tables)
    return jax.vmap(one)(mapped.tables, conditioning)

  def render_prompts(params, stats, inputs, index, cameras):
    outs = []
    for start in tqdm.tqdm(range(0, len(inputs), chunk), desc="rendering prompts",
                           leave=False, disable=len(inputs) <= chunk):
      part_inputs, part_index = inputs[start:start + chunk], index[start:start + chunk]
      padding = chunk - len(part_inputs)  # one shape, one compilation
      part_inputs = np.concatenate([part_inputs, np.repeat(part_inputs[-1:], padding, 0)])
      part_index = np.concatenate([part_index, np.repeat(part_index[-1:], padding, 0)])
      out = render_chunk(params, stats, part_inputs, part_index, cameras)
      outs.append(jax.tree.map(lambda x: np.asarray(x)[:chunk - padding], out))
    return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}

  return render_prompts


def _eval_rows(num_prompts: int, limit: int) -> np.ndarray:
  """Sorted rows of the prompts to evaluate: all, or a fixed random subset of
  `limit` (> 0) rows, the same in every evaluation, so large sets stay cheap."""
  if not limit or num_prompts <= limit:
    return np.arange(num_prompts)
  return np.sort(np.random.default_rng(0).choice(num_prompts, limit, replace=False))


def evaluate(config, model, guidance, params, stats, train_tables: PromptTables,
             heldout_tables: Optional[PromptTables], frames: float) -> dict:
  """eval.json: metrics of train and held-out prompts over the fixed views:
  ground truth for shapes sets (eval.kind "shapes"), CLIP R-probability and
  R-precision for real ones ("clip")."""
  cameras = shapes_eval.eval_cameras(config.eval.elevations_deg,
                                     config.eval.views_per_elevation,
                                     config.eval.distance, config.eval.fov_y_deg)
  height, width = config.camera.height, config.camera.width
  render = make_render_prompts(model, guidance.background_color, height, width)
  results = {"frames_per_prompt": frames, "per_prompt": []}
  splits = [("train", train_tables,
             _eval_rows(len(train_tables.prompts), config.eval.max_train_prompts))]
  if heldout_tables is not None and config.mapping.kind != "per_prompt":
    splits.append(("heldout", heldout_tables, _eval_rows(
        len(heldout_tables.prompts), config.eval.max_heldout_prompts)))
  # Render every split, then score all prompts together: R-precision picks
  # among all evaluated prompts (train and held-out), as CLIP R-precision
  # picks among the whole prompt set.
  prompts, split_of, rgb, opacity = [], [], [], []
  for split, tables, rows in splits:
    inputs = mapping_inputs(config, tables.embedding[rows])
    index = rows.astype(np.int32) if split == "train" else np.zeros(len(rows), np.int32)
    out = render(params, stats, inputs, index, cameras)
    prompts += [tables.prompts[i] for i in rows]
    split_of += [split] * len(rows)
    rgb.append(out["rgb"])
    opacity.append(out["opacity"])
  rgb, opacity = np.concatenate(rgb), np.concatenate(opacity)
  if config.eval.kind == "shapes":
    truth = shapes_eval.ground_truth(prompts, cameras, height, width)
    scored = shapes_eval.score_prompts(prompts, rgb, opacity, truth)
    summarize = shapes_eval.summarize
  elif config.eval.kind == "clip":
    from att3d_jax.eval import clip_eval  # pylint: disable=g-import-not-at-top
    scored = clip_eval.score_prompts(prompts, rgb, config.eval.clip_path)
    summarize = clip_eval.summarize
  else:
    raise ValueError(f"unknown eval kind {config.eval.kind!r}; expected 'shapes' or 'clip'")
  for split, _, _ in splits:
    rows = [row for row, owner in zip(scored, split_of) if owner == split]
    results[split] = summarize(rows)
    results["per_prompt"] += [{"split": split, **row} for row in rows]
  if "heldout" not in results:
    results["heldout"] = None  # per-prompt grids do not exist for unseen prompts
  return results


def write_outputs(config, model, guidance, params, stats, tables: PromptTables,
                  rows: np.ndarray, out_dir: pathlib.Path) -> None:
  """Turntable GIF, mesh (.obj, .glb) and a contact sheet of each prompt in rows."""
  out_dir.mkdir(parents=True, exist_ok=True)
  size = config.eval.turntable_size
  cameras = cameras_lib.turntable_cameras(config.eval.turntable_frames, 20.0,
                                          config.eval.distance, config.eval.fov_y_deg)
  render = make_render_prompts(model, guidance.background_color, size, size, chunk=4)
  inputs = mapping_inputs(config, tables.embedding[rows])
  index = rows.astype(np.int32)
  frames = render(params, stats, inputs, index, cameras)["rgb"]
  mapped, _ = jax.jit(model.apply_mapping)(params, stats, inputs, index)
  for i, row in enumerate(tqdm.tqdm(rows, desc="turntables and meshes", leave=False)):
    name = names.for_prompt(tables.prompts[row])
    turntable.write_gif(frames[i], out_dir / f"{name}.gif", fps=12)
    turntable.save_png(turntable.contact_sheet(frames[i][::max(1, len(frames[i]) // 8)]),
                       out_dir / f"{name}.png")
    conditioning = None if mapped.conditioning is None else mapped.conditioning[i]
    try:
      mesh = model.extract_mesh(params["mlp"], mapped.tables[i], conditioning,
                                config.eval.mesh_resolution)
      mesh_lib.export_mesh(mesh, out_dir, name)
    except ValueError as error:  # an empty field: say so, keep the other outputs
      print(f"no mesh for {tables.prompts[row]!r}: {error}")


def sample_sheet(config, model, guidance, params, stats, tables: PromptTables,
                 path: pathlib.Path, max_prompts: int = 8) -> None:
  """Front views of the first prompts, one row per prompt (a training preview)."""
  cameras = cameras_lib.ring_cameras((20.0,), 4, config.eval.distance, config.eval.fov_y_deg)
  rows = np.arange(min(max_prompts, len(tables.prompts)))
  render = make_render_prompts(model, guidance.background_color, config.camera.height,
                               config.camera.width)
  rgb = render(params, stats, mapping_inputs(config, tables.embedding[rows]),
               rows.astype(np.int32), cameras)["rgb"]
  turntable.save_png(turntable.contact_sheet(rgb.reshape((-1,) + rgb.shape[2:]), columns=4),
                     path)


# ---------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      (workdir / CHECKPOINT_DIR).resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False))


UNREADABLE_DIR = "unreadable_checkpoints"


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves the checkpoints of `steps` to workdir/unreadable_checkpoints/: kept
  for inspection, but no longer in the way of the run saving those steps again
  (orbax skips a save at or below its latest step)."""
  if jax.process_index() == 0:
    directory = pathlib.Path(manager.directory)
    target = directory.parent / UNREADABLE_DIR
    target.mkdir(exist_ok=True)
    for step in steps:
      moved = target / f"{step}_{time.strftime('%Y%m%d-%H%M%S')}"
      (directory / str(step)).rename(moved)
      print(f"WARNING: moved the unreadable checkpoint of step {step} to {moved}", flush=True)
  multihost_utils.sync_global_devices("att3d_jax: unreadable checkpoints set aside")
  manager.reload()


def restore_latest(manager: ocp.CheckpointManager, state: dict) -> dict:
  """The newest checkpoint that restores; a corrupt one is skipped with a
  warning and the previous one used. Returns `state` if there is none.

  Raises:
    RuntimeError: if checkpoints exist but none restores: starting over would
      delete them, so the run stops instead.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as error:  # pylint: disable=broad-except
      print(f"WARNING: checkpoint at step {step} is unreadable ({type(error).__name__}: "
            f"{str(error)[:200]}); trying the previous one", flush=True)
      continue
    print(f"resumed from step {step}", flush=True)
    return restored
  if steps:
    raise RuntimeError(
        f"none of the checkpoints {steps} in {manager.directory} could be restored into "
        "this config's train state (see the warnings above: corrupt files, or a different "
        "model structure). Refusing to start over, which would delete them; move the "
        "workdir away or pass a fresh --workdir.")
  return state


IDENTITY_KEYS = ("prompts", "mapping", "hashgrid", "field", "guidance.kind",
                 "batch.prompts_per_step")


def check_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose checkpoints come from an incompatible config."""
  path = workdir / "config.json"
  if not path.exists() or not (workdir / CHECKPOINT_DIR).exists():
    return
  old = json.loads(path.read_text())
  new = json.loads(config.to_json_best_effort())
  for dotted in IDENTITY_KEYS:
    old_value, new_value = old, new
    for part in dotted.split("."):
      old_value, new_value = old_value.get(part), new_value.get(part)
    if old_value != new_value:
      raise ValueError(
          f"workdir {workdir} holds checkpoints of a different config ({dotted}: "
          f"{old_value!r} there, {new_value!r} now); use a fresh --workdir or the "
          "config it was made with. Nothing was overwritten.")


# ---------------------------------------------------------------------------
# The loop.


class _Preemption:
  """Turns SIGTERM into a flag the loop polls: save, then exit cleanly.

  With several processes, JAX's preemption service (started by
  jax.distributed.initialize) catches the signal instead, and `reached` makes
  every process stop after the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      if jax.process_count() == 1:
        self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler
      self._previous = None
    return self

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it after every step."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at: Optional[int] = None) -> dict:
  """Trains (resuming from workdir), then writes eval.json, turntables and meshes.

  Args:
    config: the experiment config (configs/shapes.py documents the fields).
    workdir: checkpoints, metrics.jsonl, tensorboard/, samples/, eval.json, outputs/.
    stop_at: behave as if preempted right after this step (tests).

  Returns:
    the eval results (also in workdir/eval.json); on SIGTERM (or stop_at),
    {"preempted": True, "step": ...} after saving a checkpoint. With several
    processes, every one trains and evaluates alike; only process 0 writes.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_workdir(workdir, config)
  prompt_set = load_prompts(config)
  if config.eval.kind == "clip":  # fail now, not after training
    from att3d_jax.eval import clip_eval  # pylint: disable=g-import-not-at-top
    clip_eval.check_clip_path(config.eval.clip_path)
  guidance = load_guidance(config)
  train_tables = prompt_tables(guidance, prompt_set.train)
  heldout_tables = prompt_tables(guidance, prompt_set.heldout) if prompt_set.heldout else None
  model = model_lib.ATT3DModel.from_config(
      config, num_train_prompts=len(prompt_set.train),
      embedding_dim=train_tables.embedding.shape[1])

  state, optimizer = init_state(config, model, train_tables.embedding)
  mesh = make_mesh(config)
  state = place_state(state, mesh)
  manager = checkpoint_manager(workdir, config.train.keep_checkpoints)
  state = restore_latest(manager, state)  # straight into the replicated sharding
  unreadable = [step for step in manager.all_steps() if step > int(state["step"])]
  if unreadable:
    set_aside(manager, unreadable)
  writes = jax.process_index() == 0  # logs, samples, eval.json, outputs
  if writes:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} "
          f"device(s)", flush=True)
  train_step = jit_train_step(make_train_step(config, model, guidance, optimizer), mesh,
                              state)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  num_train = len(prompt_set.train)

  start_step = int(state["step"])
  log, writer = None, None
  if writes:
    log = open(workdir / "metrics.jsonl", "a")
    writer = tensorboard.open_writer(workdir / "tensorboard")
    (workdir / "samples").mkdir(exist_ok=True)

  def local_params():
    """(params, stats) on this process's first device: evaluation, samples and
    outputs then run without the other processes."""
    return jax.device_put(jax.device_get((state["params"], state["stats"])),
                          jax.local_devices()[0])

  def log_curve(step):
    """GT metrics (no outputs) at `step` into eval_curve.jsonl: quality vs compute."""
    if not writes:
      return
    results = evaluate(config, model, guidance, *local_params(), train_tables,
                       heldout_tables, frames_per_prompt(config, step, num_train))
    results.pop("per_prompt")
    tensorboard.add_results(writer, "eval_curve", results, step)
    with open(workdir / "eval_curve.jsonl", "a") as curve:
      curve.write(json.dumps({"step": step, **results}) + "\n")

  if config.eval.curve_every and start_step == 0:
    log_curve(0)  # the density-bias blob alone: the floor every run starts from
  start = time.time()
  step = start_step
  preempted = False
  with _Preemption() as preemption, tqdm.tqdm(
      total=config.train.num_steps, initial=start_step, desc="att3d",
      disable=not (config.train.progress_bar and writes)) as progress:
    while step < config.train.num_steps:
      batch = jax.device_put(sample_batch(config, train_tables, step), data_sharding(mesh))
      state, metrics = train_step(state, batch, key)
      step += 1
      progress.update(1)
      if step % config.train.log_every == 0 or step == config.train.num_steps:
        metrics = {k: float(v) for k, v in metrics.items()}
        nan_streak, nan_total = int(state["nan_streak"]), int(state["nan_total"])
        seconds = time.time() - start
        record = {"step": step, "seconds": seconds,
                  "frames_per_prompt": frames_per_prompt(config, step, num_train),
                  "steps_per_second": (step - start_step) / max(seconds, 1e-9),
                  "nan_skips": nan_total, **metrics}
        if log is not None:
          log.write(json.dumps(record) + "\n")
          log.flush()
        if writer is not None:
          for name, value in record.items():
            if name != "step":
              writer.add_scalar(name, value, step)
        progress.set_postfix(grad=f"{metrics['grad_norm']:.3g}", skips=nan_total)
        if nan_streak >= config.train.max_nan_streak:
          manager.save(step, args=ocp.args.StandardSave(state), force=True)
          raise FloatingPointError(
              f"{nan_streak} consecutive steps had a non-finite loss or gradient (up to "
              f"step {step}); their updates were skipped. Lower optim.lr_mapping / "
              "optim.lr_mlp or set optim.grad_clip_norm. The last good state is saved.")
      if step % config.train.checkpoint_every == 0:
        manager.save(step, args=ocp.args.StandardSave(state))
      if writes and config.train.sample_every and step % config.train.sample_every == 0:
        sheet = workdir / "samples" / f"step_{step:06d}.png"
        sample_sheet(config, model, guidance, *local_params(), train_tables, sheet)
        tensorboard.add_image_file(writer, "samples", sheet, step)
      if config.eval.curve_every and step % config.eval.curve_every == 0:
        log_curve(step)
      if preemption.reached(step) or step == stop_at:
        preempted = True
        break
      if config.train.time_budget_s:
        over = time.time() - start > config.train.time_budget_s
        if jax.process_count() > 1:  # process 0's clock decides: all stop at one step
          over = bool(multihost_utils.broadcast_one_to_all(np.asarray(over)))
        if over:
          print(f"\ntime budget of {config.train.time_budget_s:.0f} s reached at step {step}")
          break
  if manager.latest_step() != step:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()
  if log is not None:
    log.close()
  if writer is not None and preempted:
    writer.close()
  if preempted:
    print(f"SIGTERM: saved step {step}; rerun the same command to resume", flush=True)
    return {"preempted": True, "step": step}

  frames = frames_per_prompt(config, step, num_train)
  params, stats = local_params()
  results = evaluate(config, model, guidance, params, stats, train_tables, heldout_tables,
                     frames)
  results.update(steps=step, train_seconds=time.time() - start,
                 num_train_prompts=num_train, mapping=config.mapping.kind)
  if not writes:
    return results
  (workdir / "eval.json").write_text(json.dumps(results, indent=2))
  tensorboard.add_results(writer, "eval", results, step)
  if config.eval.write_outputs:
    num_show = min(config.eval.num_train_outputs, num_train)
    write_outputs(config, model, guidance, params, stats, train_tables,
                  np.arange(num_show), workdir / "outputs" / "train")
    if heldout_tables is not None and config.mapping.kind != "per_prompt":
      write_outputs(config, model, guidance, params, stats, heldout_tables,
                    np.arange(len(heldout_tables.prompts)), workdir / "outputs" / "heldout")
    tensorboard.add_image_folder(writer, "outputs", workdir / "outputs", step)
  writer.close()
  return results
