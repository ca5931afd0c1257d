"""experiments/oracle_fit.py: the generator fit to ground-truth renders."""

import json

import numpy as np
import pytest

from att3d_jax import generate
from experiments import common
from experiments import oracle_fit

pytestmark = pytest.mark.usefixtures("module_compilation_cache")

# Two scenes that differ in every factor a hatless prompt has but the size.
PROMPTS = ("a red sphere", "a blue cube")


def test_fit_learns_each_prompts_scene(tiny_shapes_model, tmp_path):
  """Fitted to the ground truth, the renders of each prompt are nearest to its
  own scene: the step renders and compares each row with its own prompt's GT."""
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("\n".join(PROMPTS) + "\n")
  config = common.quick_config(tiny_shapes_model, {
      "prompts.file": str(prompt_file), "mapping.kind": "triplane", "train.num_steps": 80,
      "batch.prompts_per_step": 2, "batch.views_per_prompt": 2,
      "eval.elevations_deg": (20.0,), "eval.views_per_elevation": 4})
  results = oracle_fit.run(config, tmp_path / "out", log_every=50)
  losses = [loss for _, loss in results["losses"]]
  assert losses[-1] < 0.3 * losses[0], losses
  rows = {row["prompt"]: row for row in results["per_prompt"]}
  for prompt in PROMPTS:
    assert rows[prompt]["nearest_scene"] == prompt, rows[prompt]
    assert rows[prompt]["iou"] > 0.8, rows[prompt]
  assert results["frames_per_prompt"] == 80 * 2 * 2 / 2
  assert np.isfinite(results["train_seconds"])
  # The folder is an exported model: it loads back, with its training prompts.
  trained = generate.load_trained(str(tmp_path / "out"))
  assert json.loads((tmp_path / "out" / "eval.json").read_text())["losses"] == [
      list(pair) for pair in results["losses"]]
  assert trained.train_prompts == list(PROMPTS)


@pytest.mark.parametrize("overrides, match", [
    ({"interpolation.kind": "embedding"}, "no ground truth"),
    ({"guidance.amortize_scale": True}, "no ground truth"),
    ({"eval.kind": "clip"}, "only the shapes world"),
])
def test_refuses_what_has_no_ground_truth(overrides, match):
  config = common.variant(common.shapes.get_config("quick"), overrides)
  with pytest.raises(ValueError, match=match):
    oracle_fit.check_config(config)
