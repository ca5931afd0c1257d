"""The accelerator check (benchmarks/accelerator_check.sh, run_all --gpu) on this CPU: it
refuses without a GPU, and its whole code path runs at test sizes (--cpu_dry_run), so that
the one run on an accelerator machine cannot fail on a Python error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import accelerator
from configs import shapes as shapes_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "accelerator_check.sh")


def _env(**extra) -> dict:
  return dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", **extra)


def test_check_refuses_without_an_accelerator(tmp_path):
  result = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, cwd=REPO,
                          env=_env(ACCEL_DIR=str(tmp_path), OUT=str(tmp_path / "out")))
  assert result.returncode == 2
  assert "refusing: JAX" in result.stderr and "sees no GPU or TPU (backend: cpu)" in result.stderr
  assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def text_tables(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("accel") / "shapes_text.npz")
  accelerator.save_text_tables(path)
  return path


def test_text_tables_reproduce_minilm_conditioning(text_tables):
  from att3d_jax import build  # pylint: disable=g-import-not-at-top
  config = shapes_config.get_config("quick")
  guidance = build.load_guidance(config)
  tabled = accelerator.table_guidance(config, text_tables)
  captions = accelerator._captions(config)[:5]  # pylint: disable=protected-access
  expected = guidance.encode(captions)
  np.testing.assert_allclose(tabled.encode(captions), expected, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(tabled.embed(captions[:2]), guidance.embed(captions[:2]),
                             rtol=1e-3, atol=1e-3)
  assert tabled.uncond.shape == guidance.uncond.shape
  with pytest.raises(KeyError, match="not in the text tables"):
    tabled.encode(["a caption nobody encoded"])


def test_a_failing_group_reports_its_error(tmp_path):
  """What run() turns into the group's FAILED row: the child's JSON error line."""
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.accelerator", "--row=shapes_train_step", "--tiny",
       f"--text_tables={tmp_path / 'missing.npz'}"], capture_output=True, text=True, cwd=REPO,
      env=_env())
  assert result.returncode == 1
  (line,) = [json.loads(text) for text in result.stdout.splitlines() if text.startswith("{")]
  assert line["error"].startswith("FileNotFoundError")
  row = accelerator._error_row("shapes_train_step", line["error"])  # pylint: disable=protected-access
  assert row[0] == "shapes_train_step: FAILED" and "missing.npz" in row[1]


@pytest.mark.slow  # ~4 minutes on the 2-core CPU: every accelerator row at test sizes
def test_check_dry_run_fills_every_row(tmp_path, text_tables):
  accel_dir = tmp_path / "accel"
  accel_dir.mkdir()
  os.symlink(text_tables, accel_dir / "shapes_text.npz")
  out = tmp_path / "out"
  result = subprocess.run(
      ["bash", SCRIPT], capture_output=True, text=True, cwd=REPO,
      env=_env(ACCELERATOR_CHECK_DRY_RUN="1", ACCEL_DIR=str(accel_dir), OUT=str(out),
               ACCEL_SITE=str(tmp_path / "site"), ACCELERATOR_CHECK_TIMEOUT_S="1500"))
  assert result.returncode == 0, result.stderr[-3000:]
  table = (out / "benchmarks_gpu.md").read_text()
  assert "CPU DRY RUN" in table
  assert "FAILED" not in table, table
  rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
  names = [row.split(" | ")[0] for row in rows[1:]]
  # UNet: forward and forward+backward, each with two attention implementations.
  assert sum(name.startswith("| UNet ") for name in names) == 4
  assert sum(name.startswith("| SDS step, test-size IF-style") for name in names) == 2
  assert any("text from text tables shapes_text.npz" in name for name in names)
  assert sum(name.startswith("|   part:") for name in names) == 4
  assert (out / "accelerator_check.log").exists()
