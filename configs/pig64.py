r"""ATT3D on Pig64: "a pig {activity} {theme}" over 8 x 8, trained amortized on
the 56 off-diagonal prompts, evaluated with CLIP R-probability on those and on
the 8 held-out diagonal prompts (att3d_jax/real_prompts.py). Guided by
DeepFloyd IF stage I by default; every model comes from a local folder.

  python -m att3d_jax.main --config=configs/pig64.py --workdir=runs/pig64 \
      --config.guidance.path=/local/IF-I-XL \
      --config.guidance.text_encoder_path=/local/t5folder \
      --config.eval.clip_path=/local/clip-vit-large-patch14

The per-prompt baseline is the same config with `--config.mapping.kind=per_prompt`;
`:quick` runs 2 steps on a tiny grid. Shared settings: configs/real.py.
"""

import ml_collections

from configs import real


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return real.get_real_config("pig64", arg)
