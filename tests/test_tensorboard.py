"""TensorBoard logging: what lands in the event files, and a clear missing-package error."""

import pathlib
import struct
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from att3d_jax import tensorboard
from att3d_jax.nerf import turntable


def read_events(logdir) -> dict[str, list]:
  """tag -> [summary value] over every event file under logdir (TFRecord framing:
  length u64, its crc u32, the Event bytes, their crc u32)."""
  values = {}
  for path in sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        values.setdefault(value.tag, []).append((event.step, value))
  return values


def test_missing_tensorboardx_is_an_error_naming_the_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with pytest.raises(ImportError, match="pip install tensorboardX"):
    tensorboard.open_writer(tmp_path)


def test_grids_turntables_files_and_results_reach_the_event_file(tmp_path):
  writer = tensorboard.open_writer(tmp_path / "tb")
  images = np.random.default_rng(0).uniform(size=(6, 8, 10, 3))
  tensorboard.add_image_grid(writer, "grid", images, 3, columns=3)
  tensorboard.add_turntable(writer, "turntable", np.zeros((20, 8, 10, 3)), 3, max_frames=4)
  turntable.save_png(images[0], tmp_path / "outputs" / "train" / "a_red_cube.png")
  tensorboard.add_image_folder(writer, "outputs", tmp_path / "outputs", 3)
  results = {"frames_per_prompt": 96.0, "train": {"iou": 0.8, "color": 1.0, "count": 2},
             "heldout": None, "mapping": "hypernet",
             "per_prompt": [{"prompt": "a red cube", "iou": 0.81234},
                            {"prompt": "a|b", "iou": 0.5}]}
  tensorboard.add_results(writer, "eval", results, 3)
  writer.close()
  events = read_events(tmp_path / "tb")
  grid = events["grid"][0][1].image
  assert (grid.height, grid.width) == (16, 30)  # 2 rows x 3 columns of 8x10 frames
  strip = events["turntable"][0][1].image
  assert (strip.height, strip.width) == (8, 40)
  assert events["outputs/train/a_red_cube"][0][1].image.width == 10
  assert events["eval/train/iou"][0][1].simple_value == pytest.approx(0.8)
  assert {"eval/frames_per_prompt", "eval/train/count"} <= set(events)
  assert "eval/mapping" not in events  # strings are not scalars
  table = events["eval/per_prompt/text_summary"][0][1].tensor.string_val[0].decode()
  assert "| a red cube | 0.8123 |" in table and "a\\|b" in table


def test_flat_scalars_and_markdown_table():
  assert tensorboard.flat_scalars({"a": {"b": 1, "c": [1]}, "d": True, "e": 2.5}) == {
      "a/b": 1.0, "e": 2.5}
  assert tensorboard.markdown_table([]) == "(no rows)"
