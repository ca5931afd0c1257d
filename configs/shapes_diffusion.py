"""Config of experiments/train_shapes_diffusion.py: the embedded shapes-world
text-to-image diffusion model (pixel space, 32x32, epsilon prediction).

  python -m experiments.train_shapes_diffusion --config=configs/shapes_diffusion.py \
      --workdir=runs/shapes_diffusion
  ... --config=configs/shapes_diffusion.py:quick   # CI-sized smoke run
"""

import ml_collections

from configs import base


def unet_config(quick: bool = False) -> dict:
  """diffusers UNet2DConditionModel config (config.json), 4.25M parameters
  (17 MB in float32; 2 resnets per level would be 6.2M and 1.5x slower):
  cross-attention on MiniLM tokens only at the coarsest (8x8) level and in the
  mid block, the pooled sentence embedding added to the time embedding."""
  channels = (16, 32, 64) if quick else (32, 64, 128)
  return {
      "_class_name": "UNet2DConditionModel",
      "sample_size": 32,
      "in_channels": 3,
      "out_channels": 3,
      "layers_per_block": 1,
      "block_out_channels": list(channels),
      "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
      "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      "norm_num_groups": 8,
      "cross_attention_dim": 384,  # MiniLM token width
      "attention_head_dim": 4,  # diffusers' name for the number of heads here
      "class_embed_type": "projection",
      "projection_class_embeddings_input_dim": 384,  # pooled MiniLM embedding
      "act_fn": "silu",
      "flip_sin_to_cos": True,
      "freq_shift": 0,
  }


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == "quick"
  if arg not in (None, "quick"):
    raise ValueError(f"unknown config argument {arg!r}; expected None or 'quick'")
  config = base.get_base_config()
  base.set_shapes_world_cameras(config.camera)
  config.unet = unet_config(quick)
  # diffusers DDPMScheduler config (scheduler_config.json): cosine schedule.
  config.scheduler = {
      "_class_name": "DDPMScheduler",
      "num_train_timesteps": 1000,
      "beta_schedule": "squaredcos_cap_v2",
      "prediction_type": "epsilon",
      "clip_sample": False,
  }
  config.num_prompts = 16 if quick else 0  # train on the first N grammar prompts; 0 = all 3200
  config.text_max_length = 24  # MiniLM tokens; the longest grammar caption has 19
  # Share of each batch drawn from the 64 plain "a <color> <shape>" prompts (the
  # shapes_pig64 set and the judge's 8x8 set); the rest is uniform over all.
  config.focus_fraction = 0.0 if quick else 0.5
  # Min-SNR-gamma loss weighting (Hang et al. 2023): min(SNR, gamma) / SNR per
  # example, so low-noise steps stop dominating; 0 = plain epsilon MSE.
  config.snr_gamma = 5.0
  # > 0: also raise the x0-space weight to at least this (truncated SNR), so the
  # high-noise levels that set the coarse shape under SDS are trained, with the
  # epsilon weight capped at max_loss_weight; 0 = Min-SNR alone (weights/shapes).
  config.snr_floor = 0.0
  config.max_loss_weight = 20.0
  config.caption_dropout = 0.1  # share of empty captions, for classifier-free guidance
  config.batch_size = 4 if quick else 32
  config.num_steps = 4 if quick else 5600  # ~95 min on 2 CPU cores split into 2 devices
  config.time_budget_s = 300.0 if quick else 115 * 60.0  # stop early past this
  config.learning_rate = 4e-4
  config.warmup_steps = 10 if quick else 300
  config.lr_decay_start = 0 if quick else 2800  # > 0: cosine decay to 10% from here to num_steps
  config.grad_clip_norm = 1.0
  config.ema_decay = 0.999
  # XLA CPU devices the batch is split over (att3d_jax/xla_cpu.split_host); the
  # UNet's group norms and elementwise ops run on one thread per device.
  config.cpu_devices = 2
  config.log_every = 2 if quick else 100
  config.checkpoint_every = 2 if quick else 500  # steps
  config.sample_every = 0 if quick else 2000  # DDIM preview grid; 0 = only at the end
  config.sample_guidance_scale = 2.0
  config.sample_steps = 4 if quick else 50
  return config
