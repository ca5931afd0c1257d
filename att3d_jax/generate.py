r"""Instant text-to-3D with a trained ATT3D model: one forward pass per prompt.

  python -m att3d_jax.generate --prompt="a red cube" --prompt="a blue torus" --out=gen
  python -m att3d_jax.generate --workdir=runs/shapes --prompt="a pink sphere" --json
  python -m att3d_jax.generate --interpolate "a red cube" "a blue torus" --frames=30

prompt -> text embedding -> mapping network -> hash grid -> renders. Per
prompt, writes a turntable (GIF and MP4), a mesh (.obj and .glb) and a PNG
contact sheet; `--interpolate A B` writes a video (GIF, MP4) and a strip PNG
of the path from A to B. Without --workdir the shipped pretrained shapes model
(package data, att3d_jax/weights/att3d_shapes) is used. `--json` prints one
JSON line per prompt with the latency of each stage in ms (embed, mapping,
render of one 64x64 view, mesh); the first prompt includes compilation, later
ones do not.
"""

import functools
import json
import os
import pathlib
import sys
import time
from typing import NamedTuple, Optional

from absl import app
from absl import flags
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from att3d_jax import assets
from att3d_jax import build as build_lib
from att3d_jax import checkpoints
from att3d_jax import compilation_cache
from att3d_jax import names
from att3d_jax import prompt_data
from att3d_jax.amortize import model as model_lib
from att3d_jax.guidance import base as guidance_base
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.nerf import mesh as mesh_lib
from att3d_jax.nerf import render as render_lib
from att3d_jax.nerf import turntable
from att3d_jax.shapes import prompt_sets
from att3d_jax.shapes import scenes

SHIPPED_MODEL = assets.shipped("att3d_shapes")


class TrainedModel(NamedTuple):
  config: ml_collections.ConfigDict
  model: model_lib.ATT3DModel
  params: dict
  stats: dict
  guidance: guidance_base.Guidance
  train_prompts: list[str]


def export_model(workdir: str, out_dir: str) -> pathlib.Path:
  """The newest checkpoint's params (no optimizer state) + config.json -> out_dir."""
  workdir, out_dir = pathlib.Path(workdir), pathlib.Path(out_dir)
  trained = load_trained(str(workdir))
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text((workdir / "config.json").read_text())
  payload = flax.serialization.to_bytes({"params": trained.params, "stats": trained.stats})
  (out_dir / checkpoints.PARAMS_FILE).write_bytes(payload)
  return out_dir


def load_trained(path: str, guidance_path: Optional[str] = None) -> TrainedModel:
  """A training workdir (newest checkpoint) or an exported folder (params.msgpack);
  "weights/<name>" names a shipped model (assets.resolve)."""
  path = pathlib.Path(assets.resolve(path))
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path} holds no config.json: pass a training --workdir or an "
                            "exported model folder")
  config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
  if guidance_path:
    config.guidance.path = guidance_path
  built = build_lib.build(config, for_training=False)
  model, state = built.model, built.state
  loaded = checkpoints.load_params(path, {"params": state["params"], "stats": state["stats"]})
  params, stats = loaded["params"], loaded["stats"]
  return TrainedModel(config, model, params, stats, built.guidance, built.prompt_set.train)


def describe_prompt(trained: TrainedModel, prompt: str) -> str:
  """"seen", "unseen" (in the world's grammar) or "out of distribution"."""
  if not prompt.strip():
    raise ValueError("empty prompt: pass --prompt with some text")
  if prompt in trained.train_prompts:
    return "seen"
  prompts = trained.config.prompts
  if not prompts.get("file") and prompts.set in prompt_sets.PROMPT_SETS:  # shapes grammar
    try:
      scenes.parse_prompt(prompt)
    except ValueError:
      return "out of distribution"
  return "unseen"


class Generator:
  """Jitted prompt -> params -> renders of one trained model."""

  def __init__(self, trained: TrainedModel, image_size: int = 64):
    self.trained = trained
    config, model = trained.config, trained.model
    self.image_size = image_size
    self.distance, self.fov = config.eval.distance, config.eval.fov_y_deg
    if not model.mapping.generalizes:
      raise ValueError(f"a mapping.kind={config.mapping.kind!r} model does not read the "
                       "text: it cannot generate new prompts; train with "
                       "mapping.kind=hypernet or concat")

    @jax.jit
    def mapping(mapping_input):
      mapped, _ = model.apply_mapping(trained.params, trained.stats, mapping_input,
                                      jnp.zeros((mapping_input.shape[0],), jnp.int32))
      return mapped

    @functools.partial(jax.jit, static_argnames="normals")
    def render(mapped, cameras, normals: bool = False):
      conditioning = None if mapped.conditioning is None else mapped.conditioning[0]
      return render_lib.render_images(
          model.render_fn(trained.params["mlp"], _first_row(mapped.tables), conditioning, None,
                          trained.guidance.background_color, compute_normals=normals),
          cameras, image_size, image_size)

    self.mapping, self.render = mapping, render

  def mapping_input(self, prompts: list[str], weights: Optional[np.ndarray] = None,
                    scale: Optional[float] = None):
    """[1, D(+1)]: the (weighted mean of the) prompts' embedding (+ the CFG
    weight `scale` when amortized over it; default config.guidance.scale)."""
    embeddings = self.trained.guidance.embed(prompts)
    weights = np.full(len(prompts), 1.0 / len(prompts)) if weights is None else weights
    mixed = np.einsum("k,kd->d", weights.astype(np.float32), embeddings)[None]
    return prompt_data.mapping_inputs(self.trained.config, mixed,
                                      None if scale is None else np.array([scale], np.float32))

  def cameras(self, azimuths_deg, elevation_deg: float = 20.0) -> cameras_lib.Cameras:
    azimuths = jnp.deg2rad(jnp.asarray(azimuths_deg, jnp.float32))
    count = azimuths.shape[0]
    return cameras_lib.orbit_cameras(jnp.full((count,), jnp.deg2rad(elevation_deg)), azimuths,
                                     jnp.full((count,), self.distance),
                                     jnp.full((count,), jnp.deg2rad(self.fov)))

  def mesh(self, mapped, resolution: int = 64) -> mesh_lib.Mesh:
    conditioning = None if mapped.conditioning is None else mapped.conditioning[0]
    return self.trained.model.extract_mesh(self.trained.params["mlp"], _first_row(mapped.tables),
                                           conditioning, resolution)


def _first_row(tables):
  """Row 0 of per-prompt fields (any pytree with a leading batch axis)."""
  return jax.tree.map(lambda x: x[0], tables)


def _ms(start: float) -> float:
  return round(1000.0 * (time.perf_counter() - start), 2)


def generate_prompt(generator: Generator, prompt: str, out_dir: str | os.PathLike,
                    num_frames: int = 36, mesh_resolution: int = 64,
                    name: Optional[str] = None, scale: Optional[float] = None,
                    mix: Optional[tuple[str, float]] = None) -> dict:
  """Writes <name>.gif/.mp4/.png/.obj/.glb; returns the name and per-stage latency in ms.

  name: the file stem, default names.for_prompt(prompt); scale: the CFG weight
  fed to a model amortized over it; mix=(other, a): the object of
  (1 - a) c_prompt + a c_other, a point on the interpolation path.
  """
  out_dir = pathlib.Path(out_dir)
  name = name or names.for_prompt(prompt)
  timings = {"prompt": prompt, "name": name,
             "kind": describe_prompt(generator.trained, prompt)}
  start = time.perf_counter()
  if mix is None:
    mapping_input = generator.mapping_input([prompt], scale=scale)
  else:
    mapping_input = generator.mapping_input([prompt, mix[0]], np.array([1.0 - mix[1], mix[1]]),
                                            scale=scale)
  timings["embed_ms"] = _ms(start)
  start = time.perf_counter()
  mapped = jax.block_until_ready(generator.mapping(mapping_input))
  timings["mapping_ms"] = _ms(start)
  start = time.perf_counter()
  jax.block_until_ready(generator.render(mapped, generator.cameras([30.0])))
  timings["render_ms"] = _ms(start)
  start = time.perf_counter()
  try:
    mesh = generator.mesh(mapped, mesh_resolution)
    mesh_lib.export_mesh(mesh, out_dir, name)
  except ValueError as error:  # an empty field: no surface to extract
    print(f"no mesh for {prompt!r}: {error}", file=sys.stderr)
  timings["mesh_ms"] = _ms(start)
  frames = np.asarray(generator.render(
      mapped, generator.cameras(np.linspace(0.0, 360.0, num_frames, endpoint=False)))["rgb"])
  turntable.write_gif(frames, out_dir / f"{name}.gif", fps=12)
  turntable.write_mp4(frames, out_dir / f"{name}.mp4", fps=12)
  turntable.save_png(turntable.contact_sheet(frames[::max(1, num_frames // 8)], columns=4),
                     out_dir / f"{name}.png")
  return timings


def interpolate(generator: Generator, prompt_a: str, prompt_b: str,
                out_dir: str | os.PathLike, num_frames: int = 30) -> pathlib.Path:
  """Video of the objects along (1 - a) c_A + a c_B, turning while they change."""
  out_dir = pathlib.Path(out_dir)
  weights = np.linspace(0.0, 1.0, num_frames)
  frames = []
  for index, weight in enumerate(weights):
    mapped = generator.mapping(generator.mapping_input([prompt_a, prompt_b],
                                                       np.array([1.0 - weight, weight])))
    azimuth = 30.0 + 360.0 * index / num_frames
    frames.append(np.asarray(generator.render(mapped, generator.cameras([azimuth]))["rgb"][0]))
  frames = np.stack(frames)
  name = names.for_prompt(f"{prompt_a} to {prompt_b}")
  turntable.write_gif(frames, out_dir / f"{name}.gif", fps=10)
  turntable.write_mp4(frames, out_dir / f"{name}.mp4", fps=10)
  strip_rows = np.linspace(0, num_frames - 1, min(8, num_frames)).round().astype(int)
  return turntable.save_png(turntable.contact_sheet(frames[strip_rows],
                                                    columns=len(strip_rows)),
                            out_dir / f"{name}_strip.png")


def main(argv):
  pair = list(_INTERPOLATE.value or [])
  extra = argv[1:]
  if len(pair) == 1 and len(extra) == 1:  # --interpolate "A" "B"
    pair, extra = pair + extra, []
  if extra:
    raise app.UsageError(f"unexpected arguments: {extra} (quote multi-word prompts)")
  prompts = list(_PROMPTS.value or [])
  if not prompts and not pair:
    raise app.UsageError("pass --prompt=... (repeatable) and/or --interpolate A B")
  compilation_cache.enable(_COMPILATION_CACHE.value)
  source = _WORKDIR.value or str(SHIPPED_MODEL)
  trained = load_trained(source, _GUIDANCE_PATH.value)
  generator = Generator(trained, _SIZE.value)
  out_dir = pathlib.Path(_OUT.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  for prompt in prompts:
    timings = generate_prompt(generator, prompt, out_dir, _TURNTABLE_FRAMES.value,
                              _MESH_RESOLUTION.value)
    if timings["kind"] == "out of distribution":
      print(f"note: {prompt!r} is outside the training world's grammar (out of "
            "distribution); generating anyway", file=sys.stderr)
    if _JSON.value:
      print(json.dumps(timings), flush=True)
    else:
      print(f"{prompt!r} ({timings['kind']}): {out_dir}", flush=True)
  if pair:
    if len(pair) != 2:
      raise app.UsageError("--interpolate takes two prompts: --interpolate 'A' 'B'")
    strip = interpolate(generator, *pair, out_dir, _FRAMES.value)
    print(f"interpolation: {strip}", flush=True)


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "training workdir or exported model folder; "
                                 "default: the shipped pretrained shapes model")
  _PROMPTS = flags.DEFINE_multi_string("prompt", None, "prompt to generate (repeatable)")
  _INTERPOLATE = flags.DEFINE_multi_string("interpolate", None, "two prompts: "
                                           "--interpolate A --interpolate B, or "
                                           "--interpolate A B")
  _FRAMES = flags.DEFINE_integer("frames", 30, "frames of the interpolation video")
  _OUT = flags.DEFINE_string("out", "generated", "output folder")
  _SIZE = flags.DEFINE_integer("size", 64, "rendered image size")
  _TURNTABLE_FRAMES = flags.DEFINE_integer("turntable_frames", 36, "turntable frames")
  _MESH_RESOLUTION = flags.DEFINE_integer("mesh_resolution", 64, "marching-cubes lattice")
  _GUIDANCE_PATH = flags.DEFINE_string("guidance_path", None, "override the guidance "
                                       "model folder recorded in the model's config")
  _JSON = flags.DEFINE_bool("json", False, "print per-stage latency as JSON lines")
  _COMPILATION_CACHE = flags.DEFINE_string(
      "compilation_cache", compilation_cache.DEFAULT_DIR,
      "persistent XLA compilation cache folder ('' = off): later runs skip compiling")
  app.run(main)
