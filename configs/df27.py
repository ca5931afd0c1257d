r"""ATT3D on DF27: the 27 DreamFusion prompts, all trained amortized (no
held-out prompts), evaluated with CLIP R-probability. Guided by DeepFloyd IF
stage I by default; every model comes from a local folder.

  python -m att3d_jax.main --config=configs/df27.py --workdir=runs/df27 \
      --config.guidance.path=/local/IF-I-XL \
      --config.guidance.text_encoder_path=/local/t5folder \
      --config.eval.clip_path=/local/clip-vit-large-patch14
  python -m att3d_jax.main --config=configs/df27.py:quick ...  # 2 steps, tiny grid

Stable Diffusion instead: --config.guidance.kind=sd --config.guidance.scale=100
with the pipeline folder as both --config.guidance.path and
--config.guidance.text_encoder_path. Shared settings: configs/real.py.
"""

import ml_collections

from configs import real


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return real.get_real_config("df27", arg)
