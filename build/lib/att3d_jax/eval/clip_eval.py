r"""CLIP R-probability and R-precision of renders, ATT3D's metric for real prompts.

For a render of prompt p, CLIP scores every candidate prompt q (by default the
prompts being evaluated) with `logit_scale * cos(image, q)`; the softmax over
the candidates gives the probability of the correct prompt:

  R-probability(p) = mean over views of softmax_q(logits)[p]
  R-precision(p)   = mean over views of [argmax_q logits == p]

and a set's scores are the means over its prompts (ATT3D Sec. 4: the CLIP
probability of the correct prompt, averaged over views).

CLIP runs through transformers in PyTorch from a local folder holding a
`CLIPModel` saved with `save_pretrained` (config.json, weights, tokenizer files
and preprocessor_config.json), e.g. a copy of openai/clip-vit-large-patch14.
Nothing is downloaded.
"""

import functools
import os
from typing import Optional, Sequence

import numpy as np

CLIP_PATH_FLAG = "--config.eval.clip_path"
_LAYOUT = ("a local CLIP folder saved by transformers' CLIPModel.save_pretrained and "
           "CLIPProcessor.save_pretrained (config.json, model.safetensors, tokenizer files, "
           "preprocessor_config.json), e.g. a copy of openai/clip-vit-large-patch14. "
           "Nothing is downloaded.")
_BATCH = 64  # images or texts per CLIP call


def check_clip_path(clip_path: str) -> str:
  """The CLIP folder, checked without loading it (call before training, so that a
  missing flag fails in seconds, not after the run).

  Raises:
    ValueError: clip_path is empty.
    FileNotFoundError: the folder or its config.json is missing.
  """
  if not clip_path:
    raise ValueError(f"{CLIP_PATH_FLAG} is not set: CLIP evaluation needs {_LAYOUT}")
  clip_path = os.path.expanduser(clip_path)
  if not os.path.isfile(os.path.join(clip_path, "config.json")):
    raise FileNotFoundError(f"{CLIP_PATH_FLAG}={clip_path!r} has no config.json; expected "
                            f"{_LAYOUT}")
  return clip_path


@functools.lru_cache(maxsize=1)
def load_clip(clip_path: str):
  """(CLIPModel in eval mode, float32, CPU; CLIPProcessor) from a local folder."""
  clip_path = check_clip_path(clip_path)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.CLIPModel.from_pretrained(clip_path, dtype=torch.float32,
                                                 local_files_only=True).eval()
  processor = transformers.CLIPProcessor.from_pretrained(clip_path, local_files_only=True)
  return model, processor


def to_uint8(rgb: np.ndarray) -> np.ndarray:
  """Renders in [0, 1] -> uint8 images, as they would be saved and shown to CLIP."""
  return np.round(np.clip(np.asarray(rgb, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _normalized(output) -> np.ndarray:
  """Projected CLIP features [N, projection_dim], unit length. transformers >= 5
  returns them as the pooler_output of get_*_features, earlier versions bare."""
  features = getattr(output, "pooler_output", output).float().numpy()
  return features / np.linalg.norm(features, axis=-1, keepdims=True)


def clip_logits(texts: Sequence[str], images: np.ndarray, clip_path: str) -> np.ndarray:
  """CLIP's image-text logits [N, len(texts)] of uint8 images [N, H, W, 3]:
  logit_scale * cosine similarity, like CLIPModel's logits_per_image."""
  import torch  # pylint: disable=g-import-not-at-top
  model, processor = load_clip(clip_path)
  with torch.no_grad():
    text_features = []
    for start in range(0, len(texts), _BATCH):
      tokens = processor.tokenizer(list(texts[start:start + _BATCH]), padding=True,
                                   truncation=True, return_tensors="pt")
      text_features.append(_normalized(model.get_text_features(**tokens)))
    image_features = []
    for start in range(0, len(images), _BATCH):
      pixels = processor.image_processor(list(images[start:start + _BATCH]),
                                         return_tensors="pt").pixel_values
      image_features.append(_normalized(model.get_image_features(pixel_values=pixels)))
    logit_scale = float(model.logit_scale.exp())
  return logit_scale * np.concatenate(image_features) @ np.concatenate(text_features).T


def score_prompts(prompts: Sequence[str], rendered_rgb: np.ndarray, clip_path: str,
                  candidates: Optional[Sequence[str]] = None) -> list[dict]:
  """CLIP R-probability and R-precision of each prompt's renders.

  Args:
    prompts: [P] the rendered prompts.
    rendered_rgb: [P, V, H, W, 3] in [0, 1], V views of each prompt.
    clip_path: the --config.eval.clip_path folder.
    candidates: the prompts competing in the softmax (each of `prompts` must be
      one of them); default: `prompts` themselves.

  Returns:
    one dict per prompt: "prompt", "r_probability" (the correct prompt's
    softmax probability, mean over views), "r_hit" (share of views whose
    best-scoring candidate is the correct prompt).
  """
  prompts = list(prompts)
  candidates = prompts if candidates is None else list(candidates)
  rendered_rgb = np.asarray(rendered_rgb)
  if rendered_rgb.ndim != 5 or rendered_rgb.shape[0] != len(prompts) or (
      rendered_rgb.shape[-1] != 3):
    raise ValueError(f"rendered_rgb must be [P={len(prompts)}, V, H, W, 3], got "
                     f"{rendered_rgb.shape}")
  missing = [p for p in prompts if p not in candidates]
  if missing:
    raise ValueError(f"prompts missing from the candidates: {missing[:3]}")
  num_prompts, num_views = rendered_rgb.shape[:2]
  images = to_uint8(rendered_rgb.reshape((-1,) + rendered_rgb.shape[2:]))
  logits = clip_logits(candidates, images, clip_path)  # [P * V, Q]
  logits = logits.reshape(num_prompts, num_views, len(candidates))
  logits = logits - logits.max(-1, keepdims=True)
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  correct = np.asarray([candidates.index(p) for p in prompts])
  rows = []
  for i, prompt in enumerate(prompts):
    rows.append({"prompt": prompt,
                 "r_probability": float(probabilities[i, :, correct[i]].mean()),
                 "r_hit": float(np.mean(probabilities[i].argmax(-1) == correct[i]))})
  return rows


def summarize(rows: Sequence[dict]) -> dict:
  """Mean R-probability and R-precision over prompts (the set's scores)."""
  if not rows:
    raise ValueError("no scored prompts to summarize")
  return {"r_probability": float(np.mean([row["r_probability"] for row in rows])),
          "r_precision": float(np.mean([row["r_hit"] for row in rows]))}
