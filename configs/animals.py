r"""ATT3D on the compositional animal set: 2400 training prompts
("{animal} {activity} wearing {outfit} wearing {hat}") with nested 12.5% /
50% / 100% train splits (300 / 1200 / 2400 prompts) and 120 held-out prompts,
evaluated with CLIP R-probability on seen and unseen prompts
(att3d_jax/real_prompts.py). Guided by DeepFloyd IF stage I by default; every
model comes from a local folder.

  python -m att3d_jax.main --config=configs/animals.py --workdir=runs/animals \
      --config.prompts.split=12.5% \
      --config.guidance.path=/local/IF-I-XL \
      --config.guidance.text_encoder_path=/local/t5folder \
      --config.eval.clip_path=/local/clip-vit-large-patch14

Memory: the text tables hold 4 view captions x 77 x 4096 T5 embeddings per
prompt in float16, 2.5 MB a prompt: 6 GB of host memory for the 100% split
(the cache on disk stores float32). `:quick` runs 2 steps on the 12.5% split
with a tiny grid. Shared settings: configs/real.py.
"""

import ml_collections

from configs import real


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return real.get_real_config("animals", arg)
