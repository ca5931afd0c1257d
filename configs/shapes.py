r"""ATT3D on the shapes world's Pig64 analog (`shapes_pig64`): 8 colors x 8
shapes, trained amortized on the 56 off-diagonal prompts, evaluated on those
and on the 8 held-out diagonal prompts against ground truth.

  python -m att3d_jax.main --config=configs/shapes.py --workdir=runs/shapes
  python -m att3d_jax.main --config=configs/shapes.py:quick --workdir=/tmp/shapes_quick

The per-prompt baseline is the same config with `--config.mapping.kind=per_prompt`.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "quick"):
    raise ValueError(f"unknown config argument {arg!r}; expected None or 'quick'")
  quick = arg == "quick"
  config = base.get_base_config()
  base.set_shapes_world_cameras(config.camera)  # 32x32, the guidance model's framing

  config.prompts = ml_collections.ConfigDict()
  config.prompts.set = "shapes_pig64"  # att3d_jax/data/prompts/<set>/{train,heldout}.txt
  config.prompts.split = "100%"  # train split (shapes_2400: 12.5% | 50% | 100%)
  # A text file of prompts, one per line, all trained (none held out); when
  # set it replaces prompts.set and prompts.split.
  config.prompts.file = ""
  # Host memory for the text rows (att3d_jax/prompt_data.py): each prompt's mapping
  # embedding and 4 view-caption conditionings are encoded on first use and kept in a
  # least-recently-used cache of this many MB (shapes: 78 KB per prompt, ~6,700
  # prompts; T5 77 x 4096: 2.5 MB per prompt). Smaller costs re-encoding, not accuracy.
  config.prompts.text_cache_mb = 512

  # The frozen text-to-image model (att3d_jax/guidance/base.py; kind "shapes":
  # att3d_jax/shapes/diffusion.py).
  config.guidance = ml_collections.ConfigDict()
  config.guidance.kind = "shapes"  # the embedded shapes-world model
  config.guidance.path = "weights/shapes"  # diffusers folder; weights/<name> = shipped (assets.py)
  config.guidance.scale = 5.0  # classifier-free guidance weight
  # > 0: the weight anneals linearly from `scale` to this over training (as t_max
  # does); 0 = constant. Not with amortize_scale, which samples the weight per row.
  config.guidance.scale_final = 0.0
  config.guidance.amortize_scale = False  # sample the weight per row, feed it to the mapping
  config.guidance.scale_range = (2.0, 10.0)  # ... uniformly from this range
  # The weight's share of the mapping input's norm, relative to the text's (amortize/model.py).
  config.guidance.scale_input_share = 0.5
  config.guidance.t_range = (0.02, 0.98)  # SDS timesteps, fractions of the schedule
  # t_max anneals linearly to this over training; with the shipped guidance
  # model quality falls as t_max nears 0.5 (docs/design.md, History).
  config.guidance.t_max_final = 0.66
  config.guidance.weighting = "sds"  # w(t) = 1 - alpha_bar
  # The CFG weight applies where t lies in this range (fractions of the schedule);
  # outside it SDS uses the conditional model alone (weight 1): guidance in a
  # limited interval (Kynkaanniemi et al. 2024). (0, 1) guides every t: on
  # shapes_2400 guiding only t <= 0.5 rounded cubes and pyramids
  # (docs/results/compositional_scale.md, "The halo is classifier-free guidance").
  config.guidance.interval = (0.0, 1.0)

  # Text embedding -> grid (att3d_jax/amortize/mapping.py).
  config.mapping = ml_collections.ConfigDict()
  config.mapping.kind = "hypernet"  # hypernet | concat | per_prompt | triplane
  config.mapping.hidden_width = 32
  config.mapping.num_power_iterations = 10  # spectral norm, per step
  # kind "triplane" (att3d_jax/amortize/triplane.py): text -> MLP -> low-resolution
  # planes -> shared conv upsampling -> xy, xz, yz planes sampled bilinearly at each
  # point. Defaults keep its train step near the hypernet's (docs/design.md).
  config.mapping.triplane_resolution = 64  # R texels per side; above the grid's finest 48
  config.mapping.triplane_low_resolution = 8  # r, the MLP's planes; R / r a power of 2
  config.mapping.triplane_channels = 16  # C of the MLP's planes and of each 3x3 conv
  config.mapping.triplane_features = 8  # F per plane; the field MLP reads 3F (concat)
  config.mapping.triplane_hidden_width = 128  # the MLP's hidden layer (output: 3 r^2 C)
  config.mapping.triplane_combine = "concat"  # concat | sum (EG3D) of the 3 planes' samples
  config.mapping.triplane_spectral_norm = True  # on the MLP, as the hypernet (ATT3D)

  # A small grid: the hypernet's output layer is hidden_width x (L * T * F).
  config.hashgrid.num_levels = 6
  config.hashgrid.log2_table_size = 12
  config.hashgrid.features_per_level = 2
  config.hashgrid.base_resolution = 8
  config.hashgrid.max_resolution = 48
  config.field.hidden_width = 32
  # Empty-space skipping (nerf/render.py proposal_edges): 12 gradient-free
  # samples per ray find the surface, 12 rendered ones sample it: the quality
  # of 48 evenly spaced samples at half the step time (docs/design.md, History).
  config.render.num_samples = 12
  config.render.num_proposal = 12

  config.batch = ml_collections.ConfigDict()
  config.batch.prompts_per_step = 8  # B rows, sharded over devices
  config.batch.views_per_prompt = 2  # V rendered views per row
  # Rows are distinct prompts (a random permutation's first B) instead of
  # draws with replacement; with B = the number of prompts, every prompt
  # trains every step (the per-prompt baseline, configs/sds_single.py).
  config.batch.without_replacement = False

  # Interpolation training (att3d_jax/amortize/interpolation.py).
  config.interpolation = ml_collections.ConfigDict()
  config.interpolation.kind = "none"  # none | embedding | loss
  config.interpolation.num_prompts = 2  # k prompts mixed per row
  config.interpolation.kappa = 1.0  # alpha ~ Dirichlet(kappa * ones(k))
  config.interpolation.fraction = 0.5  # share of rows that are interpolants

  config.optim = ml_collections.ConfigDict()
  config.optim.lr_mapping = 1e-2  # hypernet / shared grid / per-prompt grids
  config.optim.lr_mlp = 1e-2
  config.optim.b1 = 0.9
  config.optim.b2 = 0.99
  config.optim.eps = 1e-15
  config.optim.grad_clip_norm = 0.0  # 0 = no clipping
  # Both learning rates decay (cosine over train.num_steps) to this fraction of
  # themselves; 1 = constant.
  config.optim.lr_final_fraction = 1.0
  # Per rendered pixel, on its opacity (sparsity: SDS pays nothing for density
  # colored like the background); 0 = off.
  config.optim.opacity_penalty = 0.0

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 500  # 143 rendered frames per prompt (see t_max_final)
  # > 0: stop (then evaluate) after this many seconds; keeps the default run within
  # 30 minutes on a 2-core CPU even when the machine is shared.
  config.train.time_budget_s = 0.0 if quick else 25 * 60.0
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.train.keep_checkpoints = 3
  # Fine-tuning: a fresh run starts from the params and stats of this exported
  # model folder, training workdir or weights/<name> (a shipped model) instead
  # of a random init; optimizer, step and schedules start fresh
  # (train.initialize_from). Its model config must make the same arrays. "" = off.
  config.train.init_from = ""
  config.train.sample_every = 500  # preview PNG in workdir/samples; 0 = never
  config.train.max_nan_streak = 20  # abort after this many consecutive skipped steps
  config.train.progress_bar = True
  # Multi-host: jax.distributed.initialize() first (att3d_jax/sharding.py
  # initialize_distributed); the batch is sharded over every process's devices.
  config.train.distributed = False
  # On a CPU, split it into this many XLA devices (att3d_jax/xla_cpu.py): the
  # batch's data mesh then keeps every core busy. Must divide
  # batch.prompts_per_step; 1 = off. Read by main.py and by the experiments
  # that train this config (experiments/*).
  config.train.cpu_devices = 2
  # Devices per hypernetwork shard: a 2-D mesh ("data", "model") splits the
  # output layer (and its Adam state) over "model"; 1 = data parallel only.
  config.train.model_parallelism = 1

  # Ground-truth evaluation over fixed views (att3d_jax/eval/shapes_eval.py).
  config.eval = ml_collections.ConfigDict()
  config.eval.kind = "shapes"  # shapes: ground truth | clip: CLIP R-probability (real sets)
  config.eval.elevations_deg = (20.0, 50.0)
  config.eval.views_per_elevation = 8
  config.eval.distance = 1.8
  config.eval.fov_y_deg = 45.0
  config.eval.curve_every = 0  # > 0: GT metrics every N steps (and at step 0) into eval_curve.jsonl
  config.eval.max_train_prompts = 64  # evaluate at most this many training prompts
  config.eval.max_heldout_prompts = 0  # ... and held-out prompts (0 = all)
  config.eval.write_outputs = True  # turntables and meshes
  config.eval.num_train_outputs = 8  # of the first training prompts
  config.eval.num_heldout_outputs = 0  # ... and held-out prompts (0 = all)
  config.eval.turntable_frames = 24
  config.eval.turntable_size = 64
  config.eval.mesh_resolution = 64

  if quick:
    config.train.num_steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.sample_every = 0
    config.batch.prompts_per_step = 4
    config.eval.views_per_elevation = 4
    config.eval.num_train_outputs = 2
    config.eval.turntable_frames = 4
    config.eval.turntable_size = 32
    config.eval.mesh_resolution = 32
  return config
