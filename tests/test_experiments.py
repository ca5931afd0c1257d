"""The ATT3D experiments end to end at CI size, through their run() functions.

Each run trains tiny models (2-3 steps of configs/shapes.py:quick) with the
tiny random shapes diffusion model, so the numbers are checked for being
finite and in range, not for quality. The runs share one persistent XLA
compilation cache: their train steps, renderers and GT renderers compile once.
"""

import csv
import functools

import numpy as np
import pytest

from att3d_jax import prompt_data
from att3d_jax.eval import shapes_eval
from att3d_jax.shapes import diffusion
from experiments import common
from experiments import generalization
from experiments import guidance_weight
from experiments import interpolation
from experiments import quality_vs_compute
from experiments import text_probe

pytestmark = pytest.mark.usefixtures("module_compilation_cache")


@pytest.fixture(autouse=True)
def small_text_batches(monkeypatch):
  """Captions are encoded 32 at a time, not 256: the sets here are small, and a
  padded batch of 256 would make text encoding most of these tests' time."""
  monkeypatch.setattr(diffusion, "encode_captions",
                      functools.partial(diffusion.encode_captions, batch_size=32))


@pytest.fixture
def tiny_config(tiny_shapes_model):
  """configs/shapes.py:quick with the tiny model, 2 steps, 1 evaluation view, 8
  training prompts scored."""
  return common.quick_config(tiny_shapes_model, {
      **common.TINY, "train.num_steps": 2, "eval.views_per_elevation": 1,
      "eval.max_train_prompts": 8})


def check_metrics(row: dict, names=common.METRICS) -> None:
  for name in names:
    if row[name] is None:  # e.g. factor_hat_color of prompts without hats
      assert name in shapes_eval.FACTOR_METRICS, (name, row)
      continue
    assert np.isfinite(row[name]), (name, row)
    if name.endswith("psnr"):
      assert 0.0 < row[name] < 100.0, (name, row)
    else:
      assert 0.0 <= row[name] <= 1.0, (name, row)


def read_csv(path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_variant_copies_and_rejects_unknown_fields(tiny_config):
  changed = common.variant(tiny_config, {"mapping.kind": "concat"})
  assert changed.mapping.kind == "concat" and tiny_config.mapping.kind == "hypernet"
  with pytest.raises(ValueError, match="mapping.knd"):
    common.variant(tiny_config, {"mapping.knd": "concat"})
  with pytest.raises(ValueError, match="seed.value"):
    common.variant(tiny_config, {"seed.value": 1})


def test_frames_to_reach_interpolates_the_first_crossing():
  curve = [(0.0, 0.5), (10.0, 0.7), (20.0, 0.9), (30.0, 0.6), (40.0, 0.95)]
  assert common.frames_to_reach(curve, 0.8) == pytest.approx(15.0)
  assert common.frames_to_reach(curve, 0.5) == 0.0
  assert common.frames_to_reach(curve, 0.99) is None


@pytest.mark.slow  # minutes under `pytest -n 2`: kept out of the default suite
def test_quality_vs_compute(tiny_config, tmp_path):
  rows = quality_vs_compute.run(tiny_config, str(tmp_path), ("hypernet", "per_prompt"),
                                curve_every=2, per_prompt_factor=2)
  # The per-prompt baseline trains twice the steps: 4.
  assert {(r["mapping"], r["split"], r["step"]) for r in rows} == {
      ("hypernet", split, step) for split in ("train", "heldout") for step in (0, 2)} | {
      ("per_prompt", "train", step) for step in (0, 2, 4)}
  for row in rows:
    check_metrics(row)
  assert len(read_csv(tmp_path / "quality_vs_compute.csv")) == len(rows)
  assert (tmp_path / "quality_vs_compute.png").stat().st_size > 0
  table = (tmp_path / "quality_vs_compute.md").read_text()
  assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 3  # 3 budgets
  assert table.count("- per_prompt seen: ") == 2  # reaches its own final and best
  assert (tmp_path / "config.json").is_file()


def test_quality_vs_compute_table_reads_budgets_and_ratios():
  def row(mapping, split, frames, iou):
    return {"mapping": mapping, "split": split, "step": frames, "frames_per_prompt": frames,
            "iou": iou, "r_precision": 1.0}
  rows = [row("hypernet", "train", 0, 0.5), row("hypernet", "train", 50, 0.9),
          row("hypernet", "heldout", 0, 0.5), row("hypernet", "heldout", 50, 0.7),
          row("per_prompt", "train", 0, 0.5), row("per_prompt", "train", 100, 0.8),
          row("per_prompt", "train", 200, 0.7)]
  lines = quality_vs_compute.table(rows).splitlines()
  assert lines[0].startswith("| frames per prompt | hypernet seen IoU | hypernet unseen IoU | "
                             "per_prompt seen IoU |")
  assert "| 50 | 0.900 | 0.700 | - |" in lines[3]
  assert "| 200 | - | - | 0.700 |" in lines[5]
  # Final per-prompt IoU 0.7 (200 frames): hypernet seen crosses it at 0.2 / 0.4 of 50
  # frames, unseen at 50, per-prompt itself first at 2/3 of 100.
  final = lines.index(next(line for line in lines
                           if "baseline's final seen IoU (0.700" in line))
  assert lines[final + 2:final + 5] == ["- hypernet seen: 25 (12% of the baseline's)",
                                        "- hypernet unseen: 50 (25% of the baseline's)",
                                        "- per_prompt seen: 67 (33% of the baseline's)"]
  best = lines.index(next(line for line in lines
                          if "baseline's best seen IoU (0.800" in line))
  assert lines[best + 2:best + 5] == ["- hypernet seen: 38 (38% of the baseline's)",
                                      "- hypernet unseen: not reached",
                                      "- per_prompt seen: 100 (100% of the baseline's)"]


@pytest.mark.slow  # minutes under `pytest -n 2`: kept out of the default suite
def test_generalization(tiny_config, tmp_path, monkeypatch):
  # shapes_2400 at 1/125 of its size (the splits stay nested prefixes: 2 and 16
  # prompts), 4 held-out prompts: the experiment's logic at CI cost.
  load_prompts = prompt_data.load_prompts
  # (The per-prompt baseline's prompts.file, 2 held-out prompts, stays whole.)
  monkeypatch.setattr(prompt_data, "load_prompts", lambda config: (lambda s: s if (
      config.prompts.file) else s._replace(train=s.train[:len(s.train) // 125],
                                           heldout=s.heldout[:4]))(load_prompts(config)))
  rows = generalization.run(tiny_config, str(tmp_path), ("12.5%", "100%"), curve_every=2,
                            num_steps=3, budget_min=0.0, eval_views=2, baseline_prompts=2)
  amortized = [r for r in rows if r["generator"] == "hypernet"]
  # Curve points at steps 0 and 2, and the final evaluation at step 3.
  assert {(r["train_split"], r["num_train_prompts"], r["split"], r["step"])
          for r in amortized} == {
      (split, count, prompts, step) for split, count in (("12.5%", 2), ("100%", 16))
      for prompts in ("train", "heldout") for step in (0, 2, 3)}
  for row in rows:
    check_metrics(row)
  for row in amortized:
    assert row["rendered_frames"] == row["step"] * 4 * 2  # B x V
  assert [r["num_train_prompts"] for r in generalization.equal_compute_rows(rows)] == [2, 16]
  # Equal frames per training prompt: 16 prompts at step 3 = 1.5 frames; the
  # 2-prompt run reaches at most that at step 0.
  assert [(r["num_train_prompts"], r["step"])
          for r in generalization.equal_frames_rows(rows)] == [(2, 0), (16, 3)]
  # Per-prompt optimization of 2 held-out prompts, 1 view each: 24 total
  # frames / 2400 prompts -> 1 frame (step) each at equal total compute, on
  # to 24 / 250 -> still 1 step.
  baseline = [r for r in rows if r["generator"] == "per_prompt"]
  assert {r["step"] for r in baseline if r["equal_total_compute"]} == {1}
  assert all(r["num_train_prompts"] == 2 and r["split"] == "heldout" for r in baseline)
  assert len(read_csv(tmp_path / "generalization.csv")) == len(rows)
  assert (tmp_path / "generalization.png").stat().st_size > 0
  assert (tmp_path / "config.json").is_file()


def test_path_smoothness_of_a_cross_fade():
  black, white = np.zeros((4, 4, 3)), np.ones((4, 4, 3))
  weights = np.linspace(0.0, 1.0, 5)
  frames = np.stack([(1 - a) * black + a * white for a in weights])
  scores = interpolation.path_smoothness(frames)
  np.testing.assert_allclose(scores["endpoint_rms"], 1.0)
  np.testing.assert_allclose(scores["smoothness_rms"], 0.25)  # endpoint_rms / (N - 1)
  np.testing.assert_allclose(scores["max_step_rms"], 0.25)
  jump = np.stack([black, black, white, white, white])
  assert interpolation.path_smoothness(jump)["max_step_rms"] == pytest.approx(1.0)


@pytest.mark.slow  # minutes under `pytest -n 2`: kept out of the default suite
def test_interpolation(tiny_config, tmp_path):
  pairs = interpolation.PAIRS[:2]
  rows = interpolation.run(tiny_config, str(tmp_path), "embedding", pairs, num_weights=3)
  assert [(r["interpolation"], r["prompt_a"], r["prompt_b"]) for r in rows] == [
      (kind, a, b) for kind in ("none", "embedding") for a, b in pairs]
  for row in rows:
    check_metrics(row, ("endpoint_iou", "endpoint_psnr", "endpoint_color_acc"))
    assert 0.0 <= row["smoothness_rms"] <= row["max_step_rms"] <= 1.0
    assert 0.0 <= row["endpoint_rms"] <= 1.0
  assert len(read_csv(tmp_path / "interpolation.csv")) == len(rows)
  for name in ("interpolation.png", "interpolation_strips.png", "config.json"):
    assert (tmp_path / name).stat().st_size > 0
  with pytest.raises(ValueError, match="interpolation"):
    interpolation.run(tiny_config, str(tmp_path), "mixed")


@pytest.mark.slow  # minutes under `pytest -n 2`: kept out of the default suite
def test_guidance_weight(tiny_config, tmp_path):
  rows = guidance_weight.run(tiny_config, str(tmp_path), weights=(2.0, 10.0))
  assert [(r["weight"], r["split"]) for r in rows] == [
      (weight, split) for weight in (2.0, 10.0) for split in ("train", "heldout")]
  for row in rows:
    check_metrics(row)
    assert row["steps"] == 2
  assert len(read_csv(tmp_path / "guidance_weight.csv")) == len(rows)
  for name in ("guidance_weight.png", "guidance_weight_strip.png", "config.json"):
    assert (tmp_path / name).stat().st_size > 0
  with pytest.raises(ValueError, match="scale_range"):
    guidance_weight.run(tiny_config, str(tmp_path / "outside"), weights=(20.0,))


def test_text_probe_separates_what_is_separable_and_not_noise():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 400)
  separable = np.eye(4)[labels] + 0.05 * rng.normal(size=(400, 4))
  assert text_probe.probe_accuracy(separable, labels, 300) == 1.0
  noise = rng.normal(size=(400, 8))
  assert text_probe.probe_accuracy(noise, labels, 300) < 0.45  # chance 0.25
