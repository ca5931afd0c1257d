"""Shared settings of the real-model ATT3D configs (df27.py, pig64.py, animals.py).

They start from configs/shapes.py, so they have every field the train loop
reads, and change what a real text-to-image model needs: DeepFloyd IF stage I
(or Stable Diffusion) from local diffusers folders, DreamFusion's cameras at
64 x 64, a larger hash grid, CLIP R-probability evaluation. Settings marked
"reimpl." follow the threestudio ATT3D reimplementation with IF-I-XL, as
summarized in the project's ATT3D notes.
"""

import ml_collections

from att3d_jax import real_prompts
from configs import base
from configs import shapes


def get_real_config(prompt_set: str, arg: str | None) -> ml_collections.ConfigDict:
  """The config of `prompt_set` (a real_prompts.PROMPT_SETS name); arg None or "quick"."""
  if arg not in (None, "quick"):
    raise ValueError(f"unknown config argument {arg!r}; expected None or 'quick'")
  quick = arg == "quick"
  config = shapes.get_config()
  config.camera = base.get_base_config().camera  # DreamFusion's ranges, 64 x 64 renders

  config.prompts.set = prompt_set  # att3d_jax/data/prompts/<set>/{train,heldout}.txt
  config.prompts.split = "100%"  # train split, one of real_prompts.PROMPT_SETS[set]

  # The frozen text-to-image model (att3d_jax/guidance/real.py). Nothing is downloaded.
  config.guidance.kind = "if"  # "if": DeepFloyd IF stage I (reimpl.) | "sd": Stable Diffusion
  config.guidance.path = ""  # required: local diffusers folder (unet/, scheduler/[, vae/])
  config.guidance.text_encoder_path = ""  # required: local folder with tokenizer/, text_encoder/
  config.guidance.text_encoder_kind = "clip"  # SD only: clip | clip_penultimate (IF: T5)
  config.guidance.cache_dir = "~/.cache/att3d_jax/text"  # text-embedding cache (.npz)
  # UNet (and VAE) params and activations: "bfloat16" | "float32" (use float32 on a CPU);
  # normalization and the attention softmax are computed in float32 either way.
  config.guidance.dtype = "bfloat16"
  # Attention implementation (guidance/attention.py): "xla" (our matmuls, fastest on CPU) |
  # "dot_product" (jax.nn.dot_product_attention) | "cudnn" (its fused cuDNN flash kernel,
  # NVIDIA GPUs, bfloat16).
  config.guidance.attention = "xla"
  # CFG 70 with IF-I-XL (reimpl., ATT3D notes); SDS with Stable Diffusion usually takes 100.
  config.guidance.scale = 70.0
  config.guidance.amortize_scale = False  # sample the weight per row, feed it to the mapping
  config.guidance.scale_range = (20.0, 100.0)  # ... uniformly from this range
  # The weight's share of the mapping input's norm, relative to the text's (amortize/model.py).
  config.guidance.scale_input_share = 0.5
  config.guidance.t_range = (0.02, 0.98)  # SDS timesteps, fractions of the schedule (reimpl.)
  config.guidance.t_max_final = 0.98  # = t_range[1]: no annealing (reimpl.)
  config.guidance.weighting = "sds"  # w(t) = 1 - alpha_bar
  # The CFG weight applies where t lies in this range (fractions of the schedule);
  # outside it SDS uses the conditional model alone (weight 1): guidance in a
  # limited interval (Kynkaanniemi et al. 2024). (0, 1) guides every t.
  config.guidance.interval = (0.0, 1.0)

  # The hypernet writes every grid entry: its output layer is hidden_width x
  # (L * T * F) = 32 x (8 * 2^16 * 2) = 32 x 1,048,576, i.e. 33.6M parameters
  # (134 MB in float32, x3 with Adam's moments), and each rendered prompt's
  # grid is 4 MB. (Reimpl.: a dense 5-level grid of 4 features, 16^3 to 64^3.)
  config.hashgrid.num_levels = 8  # L
  config.hashgrid.log2_table_size = 16  # T = 65,536 entries per level
  config.hashgrid.features_per_level = 2  # F
  config.hashgrid.base_resolution = 16  # coarsest level's cells per axis (reimpl.)
  config.hashgrid.max_resolution = 256  # finest level: 4 finer levels than the reimpl.'s 64
  config.mapping.hidden_width = 32  # (reimpl.)
  config.field.hidden_width = 64
  # 64 samples per unit of ray length, as the reimpl.'s 256 samples in its radius-2 scene.
  config.render.num_samples = 128
  config.render.num_proposal = 0  # evenly spaced, as the reimpl. (shapes.py skips empty space)

  config.batch.prompts_per_step = 8  # B rows, sharded over devices (reimpl.: 1)
  config.batch.views_per_prompt = 1  # V rendered views per row (reimpl.)

  # Optimizer: configs/shapes.py's Adam settings. The reimpl.'s lr 0.1 for the
  # hypernet assumes torch's spectral_norm, which keeps the raw U(-0.1, 0.1)
  # weights; flax's stores the normalized kernel (entries ~1e-3), against which
  # the same Adam step would be ~50x larger.

  config.train.num_steps = 20000  # (reimpl.)
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.sample_every = 1000

  # CLIP R-probability / R-precision over fixed views (att3d_jax/eval/clip_eval.py).
  config.eval.kind = "clip"
  config.eval.clip_path = ""  # required: local CLIP folder, e.g. clip-vit-large-patch14
  config.eval.elevations_deg = (20.0, 50.0)
  config.eval.views_per_elevation = 4  # 8 views per prompt
  config.eval.distance = 1.75  # the middle of camera.distance_range
  config.eval.fov_y_deg = 55.0  # the middle of camera.fov_y_range_deg
  config.eval.max_train_prompts = 64  # evaluate at most this many training prompts
  config.eval.max_heldout_prompts = 0  # ... and held-out prompts (0 = all)
  config.eval.num_train_outputs = 8  # turntables and meshes of the first training prompts

  if quick:  # a smoke test: tiny grid, 2 steps, the smallest split
    config.prompts.split = real_prompts.PROMPT_SETS[prompt_set][0]
    config.guidance.dtype = "float32"
    config.hashgrid.num_levels = 4
    config.hashgrid.log2_table_size = 10
    config.hashgrid.base_resolution = 8
    config.hashgrid.max_resolution = 32
    config.field.hidden_width = 16
    config.render.num_samples = 8
    config.batch.prompts_per_step = 2
    config.train.num_steps = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.sample_every = 0
    config.eval.views_per_elevation = 2
    config.eval.max_train_prompts = 4
    config.eval.num_train_outputs = 1
    config.eval.turntable_frames = 2
    config.eval.turntable_size = 16
    config.eval.mesh_resolution = 16
  return config
