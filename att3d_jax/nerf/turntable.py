"""Host-side writers for turntable renders: GIF, MP4, PNG and contact sheets.

Frames are `[num_frames, height, width, 3]` RGB, either floating point in
[0, 1] or uint8, in the order of `cameras.turntable_cameras` (azimuth 0 = front
first, then counter-clockwise seen from above). Everything here is numpy; jax
arrays are accepted and copied to the host.
"""

import pathlib

import imageio.v3 as iio
import numpy as np

# Slack for float frames that overshoot [0, 1] by rounding in the renderer.
_FLOAT_RANGE_TOLERANCE = 1e-3
# imageio-ffmpeg's 1-10 scale; 8 maps to libx264 CRF 10, visually lossless for
# the small flat-shaded renders this project makes.
_MP4_QUALITY = 8


def to_uint8(images, name: str = "frames", ndim: int = 4) -> np.ndarray:
  """Validates RGB images and converts them to uint8.

  Args:
    images: [..., height, width, 3] with `ndim` dimensions, uint8 or floating
      point in [0, 1] (values within 1e-3 outside are clipped).
    name: what to call the array in error messages.
    ndim: expected number of dimensions (4 for frames, 3 for one image).

  Returns:
    uint8 array of the same shape.
  """
  images = np.asarray(images)
  if images.ndim != ndim or images.shape[-1] != 3 or 0 in images.shape:
    layout = "[num_frames, height, width, 3]" if ndim == 4 else "[height, width, 3]"
    raise ValueError(f"{name} must be non-empty RGB {layout}, got shape {images.shape}")
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(f"{name} must be uint8 or floating point in [0, 1], got dtype "
                    f"{images.dtype}; convert with .astype(np.uint8) or divide by 255")
  if not np.all(np.isfinite(images)):
    num_bad = np.size(images) - np.isfinite(images).sum()
    raise ValueError(f"{name} has {num_bad} NaN/Inf values")
  low, high = float(images.min()), float(images.max())
  if low < -_FLOAT_RANGE_TOLERANCE or high > 1 + _FLOAT_RANGE_TOLERANCE:
    raise ValueError(f"floating point {name} must lie in [0, 1], got values in "
                     f"[{low:.4g}, {high:.4g}]; divide 0-255 images by 255")
  return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def _check_fps(fps: float) -> None:
  if not fps > 0:
    raise ValueError(f"fps must be positive, got {fps}")


def _prepare_path(path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


def write_gif(frames, path, fps: float = 20.0) -> pathlib.Path:
  """Writes a looping GIF (Pillow, 256-color palette per frame).

  GIF stores frame times in 1/100 s, so fps is rounded to the nearest
  representable frame time. Pillow merges identical consecutive frames into
  one longer frame, which plays the same.
  """
  frames = to_uint8(frames)
  _check_fps(fps)
  path = _prepare_path(path)
  iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0)
  return path


def pad_to_even(frames: np.ndarray) -> np.ndarray:
  """[N, H, W, C] -> [N, H + H % 2, W + W % 2, C] by repeating the last row/column.

  H.264 in yuv420p (the pixel format players support) stores color at half
  resolution and needs even sizes. Repeating the edge keeps every rendered
  pixel unchanged, where resizing would resample the whole frame, and it
  continues the background so the extra row/column is invisible.
  """
  height, width = frames.shape[1:3]
  return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def write_mp4(frames, path, fps: float = 20.0) -> pathlib.Path:
  """Writes an H.264 MP4 (yuv420p) with the ffmpeg bundled in imageio-ffmpeg.

  Odd heights/widths are padded by one pixel (see `pad_to_even`), so the video
  is [H + H % 2, W + W % 2].
  """
  # Imported here: the package carries a ~30 MB ffmpeg binary that only videos need, so
  # training and benchmarks run where it is not installed.
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  frames = pad_to_even(to_uint8(frames))
  _check_fps(fps)
  path = _prepare_path(path)
  height, width = frames.shape[1:3]
  # macro_block_size=1: the frames are already even, so ffmpeg must not rescale.
  writer = imageio_ffmpeg.write_frames(
      str(path), (width, height), fps=float(fps), codec="libx264",
      pix_fmt_out="yuv420p", quality=_MP4_QUALITY, macro_block_size=1)
  writer.send(None)  # Starts ffmpeg.
  try:
    for frame in frames:
      writer.send(np.ascontiguousarray(frame))
  finally:
    writer.close()
  return path


def contact_sheet(frames, columns: int | None = None) -> np.ndarray:
  """Tiles frames row-major into one image; unused cells are white.

  Args:
    frames: [num_frames, height, width, 3], uint8 or float in [0, 1].
    columns: frames per row; defaults to ceil(sqrt(num_frames)).

  Returns:
    [rows * height, columns * width, 3] uint8, rows = ceil(num_frames / columns).
  """
  frames = to_uint8(frames)
  num_frames, height, width, _ = frames.shape
  if columns is None:
    columns = int(np.ceil(np.sqrt(num_frames)))
  if columns < 1:
    raise ValueError(f"columns must be >= 1, got {columns}")
  rows = -(-num_frames // columns)
  cells = np.full((rows * columns, height, width, 3), 255, np.uint8)
  cells[:num_frames] = frames
  cells = cells.reshape(rows, columns, height, width, 3)
  return cells.transpose(0, 2, 1, 3, 4).reshape(rows * height, columns * width, 3)


def save_png(image, path) -> pathlib.Path:
  """Writes one [height, width, 3] image (uint8 or float in [0, 1]) as PNG."""
  image = to_uint8(image, name="image", ndim=3)
  path = _prepare_path(path)
  iio.imwrite(path, image, extension=".png")
  return path
