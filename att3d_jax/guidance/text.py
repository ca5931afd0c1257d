"""Text embeddings for real diffusion models, computed once and cached.

The encoders run through transformers in PyTorch (transformers no longer ships
Flax models) from a local folder laid out like a diffusers pipeline:

    <text_encoder_path>/tokenizer/      tokenizer files
    <text_encoder_path>/text_encoder/   config.json + weights

Encoder kinds, reproducing what diffusers' pipelines feed the UNet:
  "clip": the CLIP text model's last hidden state (final layer norm applied).
      Right for Stable Diffusion 1.x and for 2.x diffusers folders: SD 2.x uses
      OpenCLIP's penultimate layer, and its diffusers text_encoder already
      stores the tower without the last layer (23 of 24 layers).
  "clip_penultimate": hidden state of the second-to-last layer, then the final
      layer norm (diffusers' clip_skip=1), for a full-depth CLIP tower.
  "t5": the T5 encoder's last hidden state with the attention mask, prompts
      lower-cased and stripped, 77 tokens (DeepFloyd IF).

Callers encode every prompt with each view suffix (", front view", ...,
DreamFusion's view-dependent prompting); embeddings are cached in one .npz
per encoder: the file stores the texts next to the embeddings and its name
carries the encoder folder's identity, so a different encoder never hits a
stale cache. A text missing from the cache is encoded and the file rewritten.

The encoder runs on a CUDA GPU when PyTorch sees one, in bfloat16 for T5 (IF's
T5-XXL is ~19 GB in float32; float16 overflows in T5's feed-forward layers) and
float16 for CLIP, and on the CPU in float32; texts go through it in batches
with a progress bar. The cache stores float16 (what the train loop keeps of
the embeddings anyway) and lookups return float32.
"""

import hashlib
import logging
import os
from typing import Any, Sequence
import zipfile

import numpy as np
import tqdm

ENCODER_KINDS = ("clip", "clip_penultimate", "t5")
T5_MAX_LENGTH = 77  # DeepFloyd IF's text length (diffusers' IFPipeline).
_ENCODE_BATCH = 32  # texts per encoder call


def validate_prompts(prompts: Sequence[str]) -> None:
  """Raises ValueError naming the first empty or whitespace-only prompt."""
  for index, prompt in enumerate(prompts):
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError(
          f"prompt {index} is empty or whitespace ({prompt!r}); every prompt of the "
          "set must contain text. Remove it from the prompt list.")


def _check_kind_and_folder(encoder_kind: str, folder: str) -> None:
  if encoder_kind not in ENCODER_KINDS:
    raise ValueError(f"unknown text encoder kind {encoder_kind!r}; expected one of "
                     f"{ENCODER_KINDS}.")
  missing = [sub for sub in ("tokenizer", "text_encoder")
             if not os.path.isdir(os.path.join(folder, sub))]
  if missing:
    raise FileNotFoundError(
        f"text encoder folder {folder!r} is missing {missing}. Pass "
        "--config.guidance.text_encoder_path=/local/folder laid out as "
        "tokenizer/ (tokenizer files) and text_encoder/ (config.json + weights), "
        "e.g. a diffusers Stable Diffusion or DeepFloyd IF pipeline folder.")


def encoder_identity(encoder_kind: str, folder: str) -> str:
  """A readable, content-sensitive id: kind, folder name and a hash of the
  folder's absolute path and the names, sizes and modification times of its
  tokenizer and text-encoder files."""
  digest = hashlib.sha256(f"{encoder_kind}|{os.path.realpath(folder)}".encode())
  for sub in ("tokenizer", "text_encoder"):
    directory = os.path.join(folder, sub)
    for name in sorted(os.listdir(directory)):
      stat = os.stat(os.path.join(directory, name))
      digest.update(f"|{sub}/{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  name = os.path.basename(os.path.normpath(folder)) or "root"
  return f"{encoder_kind}-{name}-{digest.hexdigest()[:12]}"


def default_placement(encoder_kind: str) -> tuple[str, Any]:
  """(torch device, torch dtype) an encoder runs in: a CUDA GPU when PyTorch sees one, in
  bfloat16 (T5) or float16 (CLIP); else the CPU in float32."""
  import torch  # pylint: disable=g-import-not-at-top
  if torch.cuda.is_available():
    return "cuda", torch.bfloat16 if encoder_kind == "t5" else torch.float16
  return "cpu", torch.float32


class TextEncoder:
  """A transformers tokenizer + text model (PyTorch), on `device` in `dtype`
  (default: `default_placement`)."""

  def __init__(self, encoder_kind: str, folder: str, device: str | None = None,
               dtype: Any = None):
    _check_kind_and_folder(encoder_kind, folder)
    # Deferred imports (seconds): a run served from the cache never needs them.
    import transformers
    self.kind = encoder_kind
    default_device, default_dtype = default_placement(encoder_kind)
    self.device = device or default_device
    self.dtype = dtype or default_dtype
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(
        os.path.join(folder, "tokenizer"))
    model_class = (transformers.T5EncoderModel if encoder_kind == "t5"
                   else transformers.CLIPTextModel)
    self.model = model_class.from_pretrained(
        os.path.join(folder, "text_encoder"), dtype=self.dtype).to(self.device).eval()
    self.max_length = (T5_MAX_LENGTH if encoder_kind == "t5"
                       else self.tokenizer.model_max_length)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Embeddings [len(texts), max_length, hidden] float32."""
    import torch
    if self.kind == "t5":
      texts = [text.lower().strip() for text in texts]  # IFPipeline's preprocessing
    tokens = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length,
                            truncation=True, return_tensors="pt").to(self.device)
    # diffusers passes CLIP's attention mask only when the config asks for it.
    use_mask = self.kind == "t5" or getattr(self.model.config, "use_attention_mask", False)
    mask = tokens.attention_mask if use_mask else None
    with torch.no_grad():
      if self.kind == "clip_penultimate":
        outputs = self.model(tokens.input_ids, attention_mask=mask, output_hidden_states=True)
        hidden = self.model.final_layer_norm(outputs.hidden_states[-2])
      else:
        hidden = self.model(tokens.input_ids, attention_mask=mask).last_hidden_state
    return hidden.float().cpu().numpy()


class EmbeddingCache:
  """text -> embedding [max_length, hidden], persisted as one .npz per encoder.

  The file `<cache_dir>/text_<identity>.npz` holds `texts` [N] (str) and
  `embeddings` [N, max_length, hidden] float16. The encoder itself is loaded
  only on a miss.
  """

  def __init__(self, encoder_kind: str, folder: str, cache_dir: str):
    _check_kind_and_folder(encoder_kind, folder)
    self.encoder_kind = encoder_kind
    self.folder = folder
    self.path = os.path.join(cache_dir, f"text_{encoder_identity(encoder_kind, folder)}.npz")
    self._entries: dict[str, np.ndarray] = {}
    if os.path.exists(self.path):
      try:
        with np.load(self.path, allow_pickle=False) as data:
          self._entries = dict(zip(data["texts"].tolist(),
                                   data["embeddings"].astype(np.float16)))
      except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        # Only a cache: recomputing is always correct, so warn instead of failing.
        logging.warning("text embedding cache %s is unreadable (%s); recomputing it.",
                        self.path, error)
    self._encoder = None
    self.num_encoded = 0  # texts encoded (cache misses) by this object

  def lookup(self, texts: Sequence[str]) -> np.ndarray:
    """Embeddings [len(texts), max_length, hidden] float32 (float16 values); encodes and
    saves misses."""
    missing = list(dict.fromkeys(t for t in texts if t not in self._entries))
    if missing:
      if self._encoder is None:
        self._encoder = TextEncoder(self.encoder_kind, self.folder)
      starts = range(0, len(missing), _ENCODE_BATCH)
      description = (f"encoding {len(missing)} texts ({self.encoder_kind}, "
                     f"{self._encoder.device}, {str(self._encoder.dtype).split('.')[-1]})")
      for start in tqdm.tqdm(starts, desc=description, unit="batch", disable=len(starts) < 2):
        chunk = missing[start:start + _ENCODE_BATCH]
        self._entries.update(zip(chunk, self._encoder(chunk).astype(np.float16)))
      self.num_encoded += len(missing)
      self._save()
    return np.stack([self._entries[t] for t in texts]).astype(np.float32)

  def _save(self) -> None:
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    texts = list(self._entries)
    partial = self.path + ".partial.npz"
    np.savez(partial, texts=np.asarray(texts, dtype=np.str_),
             embeddings=np.stack([self._entries[t] for t in texts]))
    os.replace(partial, self.path)  # atomic: a crash never leaves half a cache
