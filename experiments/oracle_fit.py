r"""The generator fit to ground truth: an ATT3D run with the diffusion model taken out.

SDS asks two things of an amortized generator at once: to hold every prompt's
object, and to find it from a noisy, guided score. This experiment takes the
second away. The config's model (mapping, field, renderer), batch, cameras and
optimizer train as in `main`, but the loss compares each rendered view with the
shapes world's ground-truth render from the same camera:

    loss = mean |rgb - rgb_gt|^2 + mean |opacity - mask_gt|^2

(rgb composited on the same background; mask_gt 1 where the GT ray hits the
scene). It is then scored by the same ground-truth evaluation as a trained run
(eval.json, per-factor metrics on the seen and held-out prompts). What the
generator gets right here and not under SDS at the same frames per prompt is
lost in the guidance signal, not in the generator's capacity
(docs/results/compositional_scale.md: the tori).

  python -m experiments.oracle_fit --config=configs/shapes_2400.py --steps=2000 \
      --out_dir=runs/oracle_shapes_2400
  python -m experiments.oracle_fit --config=configs/shapes_2400.py \
      --config.mapping.kind=hypernet --steps=2000 --out_dir=runs/oracle_shapes_2400_hypernet

Prompts are drawn per step as the trainer draws them (`prompt_data.batch_index`),
one prompt per row; interpolation training and the CFG-weight input have no
ground truth and are refused. Shapes-world prompt sets only. Writes eval.json
(with train_seconds), config.json and params.msgpack into --out_dir: an
exported model's folder, which `generate.load_trained` and `export` read.
"""

import json
import pathlib
import time

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from att3d_jax import build
from att3d_jax import checkpoints
from att3d_jax import evaluation
from att3d_jax import prompt_data
from att3d_jax import train
from att3d_jax import train_step as train_step_lib
from att3d_jax.amortize import model as model_lib
from att3d_jax.shapes import gt_render
from att3d_jax.shapes import scenes


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses what has no ground truth to fit."""
  if config.eval.kind != "shapes":
    raise ValueError(f"config.eval.kind={config.eval.kind!r}: the oracle fits ground-truth "
                     "renders, which only the shapes world has (eval.kind 'shapes')")
  if config.interpolation.kind != "none" or config.guidance.amortize_scale:
    raise ValueError("interpolation training and guidance.amortize_scale have no ground "
                     "truth: set interpolation.kind='none' and amortize_scale=False")


def make_oracle_step(config: ml_collections.ConfigDict, model, background_color,
                     optimizer: optax.GradientTransformation, scene_arrays: scenes.SceneArrays):
  """The jittable `(state, mapping_input [B, D], index [B], key) -> (state, loss)`:
  one Adam step on the photometric loss of each row's views against the ground
  truth of scene_arrays[index] (stacked SceneArrays of the training prompts)."""
  height, width = config.camera.height, config.camera.width

  def step_fn(state, mapping_input, index, key):
    camera_key, render_key = jax.random.split(jax.random.fold_in(key, state["step"]))
    cameras = train_step_lib.sample_row_cameras(config, camera_key, index.shape[0])
    truth = jax.vmap(gt_render.render_views, in_axes=(0, 0, None, None))(
        jax.tree.map(lambda x: x[index], scene_arrays), cameras, height, width)

    def loss_fn(params):
      mapped, stats = model.apply_mapping(params, state["stats"], mapping_input, index,
                                          update_stats=True)
      rgb, opacity = train_step_lib.render_rows(config, model, background_color,
                                                params["mlp"], mapped.tables,
                                                mapped.conditioning, cameras, render_key)
      loss = (jnp.mean(jnp.square(rgb - truth["rgb"]))
              + jnp.mean(jnp.square(opacity - truth["mask"])))
      return loss, stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                stats=stats, opt_state=opt_state), loss

  return step_fn


def run(config: ml_collections.ConfigDict, out_dir: pathlib.Path,
        log_every: int = 100) -> dict:
  """Fits config's model to ground truth for config.train.num_steps steps and
  writes eval.json (the evaluation's dict plus train_seconds and losses)."""
  check_config(config)
  built = build.build(config, for_training=False)
  model, guidance = built.model, built.guidance
  train_tables, heldout_tables = build.text_tables(config, guidance, built.prompt_set)
  # The standardization the trainer fits (build.build): over the same rows.
  num_prompts = len(train_tables.prompts)
  state = dict(built.state)
  state["params"] = dict(state["params"], text_norm=model_lib.text_normalization(
      jnp.asarray(train_tables.embedding[prompt_data.normalization_rows(num_prompts)])))
  scene_arrays = scenes.encode_scenes([scenes.parse_prompt(p) for p in train_tables.prompts])
  step_fn = jax.jit(make_oracle_step(config, model, guidance.background_color,
                                     built.optimizer, scene_arrays))
  key = jax.random.key(config.seed)
  losses, start = [], time.time()
  for step in range(config.train.num_steps):
    index = prompt_data.batch_index(config, num_prompts, step)[:, 0]
    mapping_input = prompt_data.mapping_inputs(config, train_tables.embedding[index])
    state, loss = step_fn(state, mapping_input, index.astype(np.int32), key)
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"oracle loss is {float(loss)} at step {step}")
    if step % log_every == 0 or step == config.train.num_steps - 1:
      losses.append((step, float(loss)))
      print(f"step {step}: loss {float(loss):.5f} ({time.time() - start:.0f} s)", flush=True)
  seconds = time.time() - start
  results = evaluation.evaluate(
      config, model, guidance, state["params"], state["stats"], train_tables, heldout_tables,
      frames=train.frames_per_prompt(config, config.train.num_steps, num_prompts))
  results.update(train_seconds=seconds, losses=losses)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "eval.json").write_text(json.dumps(results, indent=1))
  (out_dir / "config.json").write_text(config.to_json(indent=1))
  # An exported model's layout: generate.load_trained(out_dir) reads it back.
  (out_dir / checkpoints.PARAMS_FILE).write_bytes(flax.serialization.to_bytes(
      {"params": state["params"], "stats": state["stats"]}))
  return results


def main(argv):
  del argv
  config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
  if _STEPS.value is not None:
    config.train.num_steps = _STEPS.value
  results = run(config, pathlib.Path(_OUT_DIR.value), _LOG_EVERY.value)
  for split in ("train", "heldout"):
    if results.get(split):
      print(split, json.dumps({k: round(v, 3) for k, v in results[split].items()
                               if isinstance(v, float)}))


if __name__ == "__main__":
  # Flags here, not at import: the tests import every experiment into one
  # process, and absl refuses a second definition of a name such as out_dir.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                            lock_config=True)
  _STEPS = flags.DEFINE_integer("steps", None, "train steps; default config.train.num_steps "
                                "(the learning-rate schedule spans these)")
  _OUT_DIR = flags.DEFINE_string("out_dir", None, "where eval.json, config.json and "
                                 "params.msgpack go")
  _LOG_EVERY = flags.DEFINE_integer("log_every", 100, "print the loss every this many steps")
  flags.mark_flags_as_required(["config", "out_dir"])
  app.run(main)
