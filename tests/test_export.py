"""Batch export from a prompts file: files per prompt, safe names, index.json."""

import json
import os
import pathlib
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import trimesh

from att3d_jax import export
from att3d_jax import names

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = ["a red cube", "a red cube", "../../x", "红色立方体", "a blue torus"]


def test_prompts_file_skips_blanks_and_comments(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("# shapes\n a red cube \n\n\t\na blue torus\n", encoding="utf-8")
  assert export.read_prompts(path) == ["a red cube", "a blue torus"]
  path.write_text("# nothing\n\n")
  with pytest.raises(ValueError, match="holds no prompts"):
    export.read_prompts(path)
  with pytest.raises(FileNotFoundError, match="--prompts_file"):
    export.read_prompts(tmp_path / "missing.txt")


def test_depth_and_normal_images_against_hand_values():
  out = {"depth": np.array([[2.0, 1.0, 0.0]]), "opacity": np.array([[1.0, 0.5, 0.0]]),
         "normal": np.array([[[0.0, 0.0, 1.0], [0.0, -0.5, 0.0], [0.0, 0.0, 0.0]]])}
  depth = export.depth_images(out, near=1.0, far=3.0)
  # surface distances 2, 2 (1 / 0.5), background: half-way gray, times opacity, black
  np.testing.assert_allclose(depth[0, :, 0], [0.5, 0.25, 0.0])
  normal = export.normal_images(out)
  np.testing.assert_allclose(normal[0, 0], [0.5, 0.5, 1.0])
  np.testing.assert_allclose(normal[0, 1], [0.75, 0.5, 0.75])  # half (0.5, 0, 0.5) + half white
  np.testing.assert_allclose(normal[0, 2], [1.0, 1.0, 1.0])


def test_export_cli_writes_every_file_and_the_index(tmp_path):
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  subprocess.run([sys.executable, "-m", "att3d_jax.export", f"--prompts_file={prompts_file}",
                  f"--out={out}", "--normals", "--depth", "--turntable_frames=6",
                  "--mesh_resolution=32", "--size=32"],
                 cwd=tmp_path, env=env, check=True, timeout=600)  # another directory
  index = json.loads((out / export.INDEX_FILE).read_text(encoding="utf-8"))
  entries = index["prompts"]
  assert [e["prompt"] for e in entries] == PROMPTS
  assert [e["name"] for e in entries] == [
      "a_red_cube", "a_red_cube-2", names.for_prompt("../../x"), names.for_prompt("红色立方体"),
      "a_blue_torus"]
  assert [e["kind"] for e in entries][:2] == ["seen", "seen"]
  assert entries[3]["kind"] == "out of distribution"
  for entry in entries:
    files = entry["files"]
    assert {"glb", "obj", "mp4", "normals_mp4", "depth_mp4"} <= set(files), files
    for file in files.values():
      assert (out / file).parent == out  # nothing escapes the output folder
  names_on_disk = sorted(p.name for p in out.iterdir())
  assert not any(".." in n or "/" in n for n in names_on_disk)
  cube = entries[0]["files"]
  mesh = trimesh.load(out / cube["glb"], force="mesh")
  assert len(mesh.faces) > 100 and mesh.visual.vertex_colors.shape[0] == len(mesh.vertices)
  assert len(trimesh.load(out / cube["obj"], force="mesh").faces) == len(mesh.faces)
  rgb, normals, depth = (iio.imread(out / cube[key])
                         for key in ("mp4", "normals_mp4", "depth_mp4"))
  assert rgb.shape == normals.shape == depth.shape == (6, 32, 32, 3)
  assert np.abs(rgb.astype(int) - normals.astype(int)).mean() > 5  # not the color render
  assert depth[:, 0, 0].max() < 10 and depth.max() > 100  # black background, lit object
