"""The benchmark suite's quick mode runs and yields a complete table."""

import os
import subprocess
import sys

import pytest

from benchmarks import run_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # minutes under `pytest -n 2`: kept out of the default suite
def test_run_all_quick_table():
  """The suite's --quick mode: every row group (the UNets, the Eigen-convolution UNets in
  a subprocess, the hash grids, the train step) and the markdown table."""
  table = run_all.run(quick=True)
  names = [row[0] for row in table]
  assert any(name.startswith("UNet forward ") for name in names)
  assert any(name.startswith("UNet forward+backward") for name in names)
  assert sum("Eigen convolutions" in name for name in names) == 2
  # Under every unsplit UNet row, its convolutions alone and the bound they set.
  unet_rows = [row for row in table if row[0].startswith("UNet ") and "split" not in row[0]]
  conv_rows = [row for row in table if "convolutions alone" in row[0]]
  assert len(conv_rows) == len(unet_rows) >= 4
  assert all("(bound " in row[3] for row in conv_rows)
  assert sum(name.startswith("hash grid") for name in names) == 3
  assert any(name.startswith("train step") for name in names)
  assert sum(name.startswith("  part:") for name in names) == 4
  assert any("FLOP/s" in name for name in names)
  markdown = run_all.to_markdown(table, run_all.machine_info(), "cmd")
  assert markdown.count("\n|") == len(table) + 2


def test_frames_to_iou_row_reads_both_curves(tmp_path):
  path = tmp_path / "curves.csv"
  path.write_text("mapping,split,step,frames_per_prompt,iou\n"
                  "hypernet,train,0,0,0.5\nhypernet,train,1,50,0.8\n"
                  "hypernet,heldout,1,50,0.1\n"
                  "per_prompt,train,0,0,0.5\nper_prompt,train,1,100,0.7\n"
                  "per_prompt,train,2,200,0.9\n")
  name, ours, reference, ratio = run_all.frames_to_iou_row(str(path), target=0.8)
  assert "0.8" in name
  assert ours == "50 frames/prompt" and reference == "per-prompt 150 frames/prompt"
  assert ratio == "3.00x fewer frames"
  assert run_all.frames_to_iou_row(str(tmp_path / "missing.csv")) is None


def test_gpu_mode_refuses_without_an_accelerator():
  result = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--gpu"],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert "--gpu: JAX sees no GPU or TPU" in result.stderr


@pytest.mark.slow  # ~2 minutes: two train steps compiled and timed, one of them in a worktree
def test_train_step_against_its_first_version():
  now, first = run_all.train_step_against_first_version(runs=1)
  assert first[0]["repo"].endswith(run_all.FIRST_TRAIN_STEP_VERSION)
  assert now[0]["repo"] == REPO
  # The speedup the table reports (2.2x when measured on an idle CPU); a loaded
  # machine still keeps it well above 1.
  assert first[0]["step_ms"] > 1.3 * now[0]["step_ms"]


def test_train_step_bench_variant_overrides():
  """--variants="a.b=1,c=x": literals parsed, strings kept, the base config untouched,
  a mistyped field refused rather than silently benchmarked as the default."""
  from benchmarks import bench_train_step
  base = bench_train_step._load_config(os.path.join(REPO, "configs", "shapes_2400.py"))
  config = bench_train_step._apply_overrides(
      base, "mapping.hidden_width=128,mapping.kind=hypernet,optim.lr_mlp=2e-3")
  assert config.mapping.hidden_width == 128 and config.mapping.kind == "hypernet"
  assert config.optim.lr_mlp == 2e-3
  assert base.mapping.hidden_width == 32 and base.mapping.kind == "triplane"
  assert bench_train_step._apply_overrides(base, "").to_dict() == base.to_dict()
  with pytest.raises(KeyError, match="mapping.hidden_widht"):
    bench_train_step._apply_overrides(base, "mapping.hidden_widht=64")
  with pytest.raises(ValueError, match="key=value"):
    bench_train_step._apply_overrides(base, "mapping.hidden_width")
