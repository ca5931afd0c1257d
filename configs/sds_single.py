r"""Per-prompt SDS with the shipped shapes diffusion model: the per-prompt
baseline of configs/shapes.py (`mapping.kind = "per_prompt"`: one free hash
grid per prompt, a shared field MLP) on 8 prompts, one per shape, all of them
in every step.

  python -m experiments.sds_single --config=configs/sds_single.py --workdir=runs/sds_single

The same trainer as the amortized runs (att3d_jax/train.py); what differs is
below: every prompt every step, more views per prompt, the model's best CFG
weight for shape accuracy, decaying learning rates and an opacity penalty.
"""

import os

import ml_collections

from configs import shapes

PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "sds_single_prompts.txt")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "quick"):
    raise ValueError(f"unknown config argument {arg!r}; expected None or 'quick'")
  quick = arg == "quick"
  config = shapes.get_config(arg)
  # One prompt per shape, a white object among them (the hardest color).
  config.prompts.file = PROMPTS_FILE
  config.mapping.kind = "per_prompt"

  config.batch.prompts_per_step = 8  # = the number of prompts ...
  config.batch.without_replacement = True  # ... so every prompt trains every step
  config.batch.views_per_prompt = 4  # rendered frames per prompt per step

  # Classifier-free guidance weight: the model's best for shape accuracy
  # (docs/shapes_model/scores.json: 0.88 at 3 vs 0.85 at 6).
  config.guidance.scale = 3.0
  config.train.num_steps = 400  # 1600 rendered frames per prompt
  config.train.time_budget_s = 0.0
  config.train.checkpoint_every = 400
  config.train.sample_every = 0
  # Late steps only refine: both rates decay (cosine) to 3% of themselves.
  config.optim.lr_final_fraction = 0.03
  config.optim.b2 = 0.999
  # Per pixel, on the rendered opacity (sparsity): SDS pays nothing for density
  # colored like the background.
  config.optim.opacity_penalty = 0.0015

  config.eval.curve_every = 100  # IoU curve (reported, never used to stop)
  config.eval.num_train_outputs = 8  # turntables and meshes of every prompt

  if quick:
    config.train.num_steps = 6
    config.eval.curve_every = 3
    config.render.num_samples = 8
    config.render.num_proposal = 8
    config.batch.views_per_prompt = 2
  return config
