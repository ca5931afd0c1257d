"""Evaluation and outputs of a trained model: renders, eval.json, turntables, meshes.

`evaluate` renders the training (and, for a mapping that generalizes,
held-out) prompts over fixed views and scores them with the scorer of
config.eval.kind, chosen from EVAL_KINDS: ground truth for shapes sets
("shapes"), CLIP R-probability and R-precision for real ones ("clip").
"""

import pathlib
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
import tqdm

from att3d_jax import names
from att3d_jax import prompt_data
from att3d_jax.amortize import model as model_lib
from att3d_jax.eval import shapes_eval
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.nerf import mesh as mesh_lib
from att3d_jax.nerf import render as render_lib
from att3d_jax.nerf import turntable
from att3d_jax.prompt_data import PromptTables


def _score_shapes(config, prompts, rgb, opacity, cameras) -> tuple[list[dict], Callable]:
  del config
  return shapes_eval.score_prompts(prompts, rgb, opacity, cameras), shapes_eval.summarize


def _score_clip(config, prompts, rgb, opacity, cameras) -> tuple[list[dict], Callable]:
  del opacity, cameras
  from att3d_jax.eval import clip_eval  # pylint: disable=g-import-not-at-top  (torch: seconds)
  return clip_eval.score_prompts(prompts, rgb, config.eval.clip_path), clip_eval.summarize


def _check_clip(config) -> None:
  from att3d_jax.eval import clip_eval  # pylint: disable=g-import-not-at-top
  clip_eval.check_clip_path(config.eval.clip_path)


class EvalKind(NamedTuple):
  """How one config.eval.kind scores renders."""

  # (config, prompts [P], rgb [P, V, H, W, 3], opacity [P, V, H, W], cameras)
  #   -> (per-prompt rows, summarize: rows -> split metrics)
  score: Callable
  check: Callable = lambda config: None  # run before training: fail early


EVAL_KINDS = {"shapes": EvalKind(_score_shapes), "clip": EvalKind(_score_clip, _check_clip)}


def eval_kind(config) -> EvalKind:
  """config.eval.kind's scorer (ValueError naming the flag if unknown)."""
  if config.eval.kind not in EVAL_KINDS:
    raise ValueError(f"unknown --config.eval.kind={config.eval.kind!r}; expected one of "
                     f"{tuple(EVAL_KINDS)}")
  return EVAL_KINDS[config.eval.kind]


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
      outs.append(jax.tree.map(lambda x, keep=chunk - padding: np.asarray(x)[:keep], out))
    return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}

  return render_prompts


def eval_rows(num_prompts: int, limit: int) -> np.ndarray:
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
             eval_rows(len(train_tables.prompts), config.eval.max_train_prompts))]
  if heldout_tables is not None and model.mapping.generalizes:
    splits.append(("heldout", heldout_tables, eval_rows(
        len(heldout_tables.prompts), config.eval.max_heldout_prompts)))
  # Render every split, then score all prompts together: R-precision picks
  # among all evaluated prompts (train and held-out), as CLIP R-precision
  # picks among the whole prompt set.
  prompts, split_of, rgb, opacity = [], [], [], []
  for split, tables, rows in splits:
    inputs = prompt_data.mapping_inputs(config, tables.embedding[rows])
    index = rows.astype(np.int32) if split == "train" else np.zeros(len(rows), np.int32)
    out = render(params, stats, inputs, index, cameras)
    prompts += [tables.prompts[i] for i in rows]
    split_of += [split] * len(rows)
    rgb.append(out["rgb"])
    opacity.append(out["opacity"])
  rgb, opacity = np.concatenate(rgb), np.concatenate(opacity)
  scored, summarize = eval_kind(config).score(config, prompts, rgb, opacity, cameras)
  for split, _, _ in splits:
    rows = [row for row, owner in zip(scored, split_of) if owner == split]
    results[split] = summarize(rows)
    results["per_prompt"] += [{"split": split, **row} for row in rows]
  if "heldout" not in results:
    results["heldout"] = None  # e.g. per-prompt grids do not exist for unseen prompts
  return results


def write_outputs(config, model, guidance, params, stats, tables: PromptTables,
                  rows: np.ndarray, out_dir: pathlib.Path) -> None:
  """Turntable GIF, mesh (.obj, .glb) and a contact sheet of each prompt in rows."""
  out_dir.mkdir(parents=True, exist_ok=True)
  size = config.eval.turntable_size
  cameras = cameras_lib.turntable_cameras(config.eval.turntable_frames, 20.0,
                                          config.eval.distance, config.eval.fov_y_deg)
  render = make_render_prompts(model, guidance.background_color, size, size, chunk=4)
  inputs = prompt_data.mapping_inputs(config, tables.embedding[rows])
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
      mesh = model.extract_mesh(params["mlp"], jax.tree.map(lambda x, i=i: x[i], mapped.tables),
                                conditioning, config.eval.mesh_resolution)
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
  rgb = render(params, stats, prompt_data.mapping_inputs(config, tables.embedding[rows]),
               rows.astype(np.int32), cameras)["rgb"]
  turntable.save_png(turntable.contact_sheet(rgb.reshape((-1,) + rgb.shape[2:]), columns=4),
                     path)
