"""TensorBoard logging: scalars, image grids, turntable frames and tables.

Trainers open one writer with `open_writer(logdir)` (tensorboardX's
SummaryWriter; a missing tensorboardX is an ImportError that names the install
command, never a silent skip) and log through the functions here, so every
trainer writes images and tables the same way:

  add_image_grid   [N, H, W, 3] images as one contact sheet (sample grids);
  add_turntable    [T, H, W, 3] frames as one strip image (tensorboardX's video
                   needs moviepy, which the project does not install);
  add_image_file   a PNG written elsewhere (sample sheets, contact sheets);
  add_image_folder every PNG under a folder (a run's turntable contact sheets);
  add_results      the numbers of a nested results dict as scalars, its
                   per-prompt rows as a markdown table (text tab).
"""

import pathlib
from typing import Any, Optional, Sequence

import imageio.v3 as iio
import numpy as np

from att3d_jax.nerf import turntable

INSTALL_HINT = "pip install tensorboardX (or: pip install -e . / bash install.sh)"


def open_writer(logdir: str | pathlib.Path):
  """A tensorboardX SummaryWriter on logdir; ImportError naming the fix if absent."""
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(f"TensorBoard logging needs tensorboardX, which is not installed: "
                      f"{INSTALL_HINT}") from error
  return tensorboardX.SummaryWriter(str(logdir))


def add_image_grid(writer, tag: str, images, step: int, columns: Optional[int] = None) -> None:
  """images [N, H, W, 3] in [0, 1] (or uint8) -> one grid image under `tag`."""
  grid = turntable.contact_sheet(np.asarray(images), columns=columns)
  writer.add_image(tag, turntable.to_uint8(grid, "grid", ndim=3), step, dataformats="HWC")


def add_turntable(writer, tag: str, frames, step: int, max_frames: int = 8) -> None:
  """frames [T, H, W, 3] -> up to max_frames evenly spaced frames as one strip."""
  frames = np.asarray(frames)
  rows = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
  add_image_grid(writer, tag, frames[rows], step, columns=len(rows))


def add_image_file(writer, tag: str, path: str | pathlib.Path, step: int) -> None:
  """An RGB(A) image file (PNG) under `tag` (alpha dropped)."""
  image = np.asarray(iio.imread(path))
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  writer.add_image(tag, image[..., :3], step, dataformats="HWC")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """Rows of one schema -> a markdown table (floats to 4 significant digits)."""
  if not rows:
    return "(no rows)"
  columns = list(rows[0])

  def cell(value):
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def flat_scalars(results: dict, prefix: str = "") -> dict[str, float]:
  """The int/float leaves of a nested dict as {"a/b": value} (lists are skipped)."""
  out = {}
  for key, value in results.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      out.update(flat_scalars(value, name))
    elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
      out[name] = float(value)
  return out


def add_results(writer, tag: str, results: dict, step: int) -> None:
  """Evaluation results: scalars for every number, per_prompt rows as a text table."""
  for name, value in flat_scalars(results, tag).items():
    writer.add_scalar(name, value, step)
  if results.get("per_prompt"):
    writer.add_text(f"{tag}/per_prompt", markdown_table(results["per_prompt"]), step)


def add_image_folder(writer, tag: str, folder: str | pathlib.Path, step: int) -> None:
  """Every PNG under folder as `tag/<subfolder>/<stem>` (e.g. turntable contact sheets)."""
  folder = pathlib.Path(folder)
  for path in sorted(folder.rglob("*.png")):
    add_image_file(writer, f"{tag}/{path.relative_to(folder).with_suffix('').as_posix()}",
                   path, step)
