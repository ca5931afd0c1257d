r"""Batch export: every prompt of a file -> meshes, turntables and an index.

  python -m att3d_jax.export --prompts_file=prompts.txt --out=export
  python -m att3d_jax.export --model=runs/shapes --prompts_file=prompts.txt --out=export \
      --normals --depth

prompts_file: one prompt per line; blank lines and lines starting with "#" are
skipped. For each prompt, in one forward pass of the model (a training workdir
or an exported model folder; default the shipped shapes model), writes
`<name>.glb` and `<name>.obj` (vertex colors), `<name>.mp4` (and .gif) turntable
and `<name>.png` contact sheet (all via `generate.generate_prompt`), with
--normals `<name>_normals.mp4` and with --depth `<name>_depth.mp4`; then
`index.json` lists each prompt with its files, its kind (seen / unseen / out
of distribution) and its latency. Names come from `names.Namer` (safe,
bounded, collision-suffixed). Meshes carry vertex colors only: a UV-textured
variant would need a UV atlas and a texture bake, not done here.
"""

import json
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np
import tqdm

from att3d_jax import compilation_cache
from att3d_jax import generate
from att3d_jax import names
from att3d_jax.nerf import turntable

INDEX_FILE = "index.json"
FPS = 12  # as generate's turntables


def read_prompts(path: str | pathlib.Path) -> list[str]:
  """Non-blank, non-comment lines of a prompts file, stripped."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--prompts_file={str(path)!r} does not exist: pass a text file "
                            "with one prompt per line")
  prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
  prompts = [p for p in prompts if p and not p.startswith("#")]
  if not prompts:
    raise ValueError(f"--prompts_file={str(path)!r} holds no prompts (blank lines and "
                     "'#' comments are skipped)")
  return prompts


def normal_images(out: dict, background: float = 1.0) -> np.ndarray:
  """World-frame normals as colors, (n / |n| + 1) / 2 over the opacity: [..., H, W, 3]."""
  normal = np.asarray(out["normal"])
  unit = normal / np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-6)
  opacity = np.asarray(out["opacity"])[..., None]
  return np.clip(opacity * 0.5 * (unit + 1.0) + (1.0 - opacity) * background, 0.0, 1.0)


def depth_images(out: dict, near: float, far: float) -> np.ndarray:
  """Surface depth as gray, near white -> far dark, background black: [..., H, W, 3].

  The renderer's depth is the expected ray distance with the background at 0;
  dividing by the opacity gives the surface's distance where the ray hits.
  """
  opacity = np.asarray(out["opacity"])
  surface = np.asarray(out["depth"]) / np.maximum(opacity, 1e-6)
  shade = np.clip((far - surface) / (far - near), 0.0, 1.0) * np.clip(opacity, 0.0, 1.0)
  return np.repeat(shade[..., None], 3, axis=-1)


def export_prompts(generator: generate.Generator, prompts: list[str], out_dir,
                   num_frames: int = 36, mesh_resolution: int = 64, normals: bool = False,
                   depth: bool = False) -> dict:
  """Writes every prompt's files and index.json under out_dir; returns the index."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  namer = names.Namer()
  azimuths = np.linspace(0.0, 360.0, num_frames, endpoint=False)
  radius = generator.trained.model.scene_radius
  near, far = generator.distance - radius, generator.distance + radius
  entries = []
  for prompt in tqdm.tqdm(prompts, desc="export", unit="prompt"):
    name = namer(prompt)
    timings = generate.generate_prompt(generator, prompt, out_dir, num_frames,
                                       mesh_resolution, name=name)
    files = {kind: f"{name}.{kind}" for kind in ("glb", "obj", "mp4", "gif", "png")
             if (out_dir / f"{name}.{kind}").is_file()}
    if normals or depth:
      mapped = generator.mapping(generator.mapping_input([prompt]))
      out = generator.render(mapped, generator.cameras(azimuths), normals=normals)
      if normals:
        files["normals_mp4"] = turntable.write_mp4(
            normal_images(out), out_dir / f"{name}_normals.mp4", fps=FPS).name
      if depth:
        files["depth_mp4"] = turntable.write_mp4(
            depth_images(out, near, far), out_dir / f"{name}_depth.mp4", fps=FPS).name
    entries.append({"prompt": prompt, "name": name, "kind": timings["kind"], "files": files,
                    "latency_ms": {k: v for k, v in timings.items() if k.endswith("_ms")}})
  index = {"num_prompts": len(entries), "turntable_frames": num_frames,
           "mesh_resolution": mesh_resolution, "image_size": generator.image_size,
           "prompts": entries}
  (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, ensure_ascii=False))
  return index


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _PROMPTS_FILE.value:
    raise app.UsageError("pass --prompts_file=FILE (one prompt per line)")
  prompts = read_prompts(_PROMPTS_FILE.value)
  compilation_cache.enable(_COMPILATION_CACHE.value)
  trained = generate.load_trained(_MODEL.value or str(generate.SHIPPED_MODEL),
                                  _GUIDANCE_PATH.value)
  generator = generate.Generator(trained, _SIZE.value)
  index = export_prompts(generator, prompts, _OUT.value, _TURNTABLE_FRAMES.value,
                         _MESH_RESOLUTION.value, _NORMALS.value, _DEPTH.value)
  for entry in index["prompts"]:
    if entry["kind"] == "out of distribution":
      print(f"note: {entry['prompt']!r} is outside the training world's grammar (out of "
            "distribution); exported anyway", file=sys.stderr)
  print(f"{index['num_prompts']} prompts -> {pathlib.Path(_OUT.value) / INDEX_FILE}")


if __name__ == "__main__":
  _MODEL = flags.DEFINE_string("model", None, "training workdir or exported model folder; "
                               "default: the shipped pretrained shapes model")
  _PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "text file, one prompt per line")
  _OUT = flags.DEFINE_string("out", "export", "output folder")
  _NORMALS = flags.DEFINE_bool("normals", False, "also write a normal-map turntable MP4")
  _DEPTH = flags.DEFINE_bool("depth", False, "also write a depth turntable MP4")
  _SIZE = flags.DEFINE_integer("size", 64, "rendered image size")
  _TURNTABLE_FRAMES = flags.DEFINE_integer("turntable_frames", 36, "turntable frames")
  _MESH_RESOLUTION = flags.DEFINE_integer("mesh_resolution", 64, "marching-cubes lattice")
  _GUIDANCE_PATH = flags.DEFINE_string("guidance_path", None, "override the guidance "
                                       "model folder recorded in the model's config")
  _COMPILATION_CACHE = flags.DEFINE_string(
      "compilation_cache", compilation_cache.DEFAULT_DIR,
      "persistent XLA compilation cache folder ('' = off): later runs skip compiling")
  app.run(main)
