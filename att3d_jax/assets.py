"""Where the shipped models live: package data under att3d_jax/weights/.

Three models travel inside the package, so `pip install .` brings them and they
are found from any working directory:
  shapes             the shapes-world text-to-image diffusion model (guidance);
  att3d_shapes       the pretrained ATT3D shapes model (`att3d_jax.generate`'s
                     default; 64 prompts, configs/shapes.py);
  att3d_shapes_2400  ATT3D on the compositional set (configs/shapes_2400.py;
                     `--workdir=weights/att3d_shapes_2400`).

Configs and saved config.json files name them the readable way they were
written before the models moved into the package, "weights/shapes";
`resolve` maps such a name to the packaged folder unless a folder of that name
exists where it is given (a path that exists always wins).
"""

import os
import pathlib

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
SHIPPED_PREFIX = "weights/"  # how configs name a shipped model: "weights/<name>"


def shipped(name: str) -> pathlib.Path:
  """The packaged folder of shipped model `name` ("shapes", "att3d_shapes", ...)."""
  path = WEIGHTS_DIR / name
  if not path.is_dir():
    available = sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.is_dir())
    raise FileNotFoundError(f"no shipped model {name!r} in {WEIGHTS_DIR}; shipped: {available}")
  return path


def resolve(path: str | os.PathLike) -> str:
  """A model folder as given if it exists, else "weights/<name>" -> shipped(name)."""
  path = os.fspath(path)
  if os.path.exists(path):
    return path
  normalized = pathlib.PurePath(path).as_posix()
  if normalized.startswith(SHIPPED_PREFIX):
    packaged = WEIGHTS_DIR / normalized[len(SHIPPED_PREFIX):]
    if packaged.is_dir():
      return str(packaged)
  return path
