"""Text encoders and the embedding cache against transformers run directly."""

import os
from typing import NamedTuple, Sequence

import numpy as np
import pytest
import tokenizers
import torch
import transformers

from att3d_jax.guidance import text
from att3d_jax.nerf import cameras

# Index 0 is the plain prompt; index 1 + cameras.view_index(...) the view's.
VIEW_SUFFIXES = ("",) + tuple(cameras.view_suffix(label) for label in cameras.VIEW_LABELS)


class PromptEmbeddings(NamedTuple):
  """Every prompt x view suffix through one cached encoder (what the tests check)."""

  prompts: tuple[str, ...]  # [P]
  suffixes: tuple[str, ...]  # [V], VIEW_SUFFIXES by default
  embeddings: np.ndarray  # [P, V, max_length, hidden] float32; text = prompt + suffix
  uncond: np.ndarray  # [max_length, hidden]: the empty (or negative) prompt


def encode_prompts(encoder_kind: str, folder: str, prompts: Sequence[str], cache_dir: str,
                   suffixes: Sequence[str] = VIEW_SUFFIXES,
                   negative_prompt: str = "") -> PromptEmbeddings:
  """Embeddings of every prompt x view suffix, plus the unconditional one.

  Args:
    encoder_kind: one of ENCODER_KINDS.
    folder: the --config.guidance.text_encoder_path folder (tokenizer/, text_encoder/).
    prompts: the prompt set; empty or whitespace prompts raise ValueError.
    cache_dir: where the .npz cache lives (created if needed).
    suffixes: appended to every prompt.
    negative_prompt: the unconditional text for classifier-free guidance
      ("" = the usual empty prompt).

  Returns:
    PromptEmbeddings; `embeddings[p, 1 + cameras.view_index(el, az)]` is the
    view-dependent embedding with the default suffixes.
  """
  text.validate_prompts(prompts)
  cache = text.EmbeddingCache(encoder_kind, folder, cache_dir)
  texts = [prompt + suffix for prompt in prompts for suffix in suffixes]
  embeddings = cache.lookup(texts + [negative_prompt])
  per_prompt = embeddings[:-1].reshape(len(prompts), len(suffixes), *embeddings.shape[1:])
  return PromptEmbeddings(prompts=tuple(prompts), suffixes=tuple(suffixes),
                          embeddings=per_prompt, uncond=embeddings[-1])


WORDS = ["a", "red", "blue", "cube", "sphere", "wearing", "hat", "front", "side", "back",
         "overhead", "view", ","]
PROMPTS = ["a red cube", "A Blue sphere wearing a red hat"]
# The cache keeps float16: its values are the float32 encoder's rounded once.
FLOAT16 = dict(rtol=2**-10, atol=1e-7)


def _save_tiny_clip(folder, num_layers=3, hidden_size=32):
  """Random 3-layer CLIP text model + a byte-level BPE tokenizer (no merges)."""
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  for char in sorted(alphabet):
    vocab.setdefault(char, len(vocab))
    vocab.setdefault(char + "</w>", len(vocab))
  tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
  tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=64,
      num_hidden_layers=num_layers,
      num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
      pad_token_id=1)
  model = transformers.CLIPTextModel(config).eval()
  model.save_pretrained(os.path.join(folder, "text_encoder"))
  return tokenizer, model


def _save_tiny_t5(folder, d_model=32):
  """Random 2-layer T5 encoder + a word-level tokenizer appending </s>."""
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
  for word in WORDS:
    vocab[word] = len(vocab)
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.normalizer = tokenizers.normalizers.Lowercase()
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  backend.post_processor = tokenizers.processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", 1)])
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
  torch.manual_seed(1)
  config = transformers.T5Config(
      vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
  model = transformers.T5EncoderModel(config).eval()
  model.save_pretrained(os.path.join(folder, "text_encoder"))
  return tokenizer, model


def _direct(tokenizer, model, texts, max_length, mask, hidden_layer=None):
  tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt")
  with torch.no_grad():
    out = model(tokens.input_ids, attention_mask=tokens.attention_mask if mask else None,
                output_hidden_states=True)
    if hidden_layer is None:
      return out.last_hidden_state.numpy()
    return model.final_layer_norm(out.hidden_states[hidden_layer]).numpy()


def test_clip_embeddings_match_transformers_and_cache(tmp_path):
  folder, cache_dir = str(tmp_path / "sd"), str(tmp_path / "cache")
  tokenizer, model = _save_tiny_clip(folder)

  result = encode_prompts("clip", folder, PROMPTS, cache_dir)
  num_views = len(VIEW_SUFFIXES)
  assert result.embeddings.shape == (2, num_views, 24, 32)
  assert VIEW_SUFFIXES[1 + 2] == ", back view"
  texts = [p + s for p in PROMPTS for s in VIEW_SUFFIXES]
  expected = _direct(tokenizer, model, texts, 24, mask=False).reshape(2, num_views, 24, 32)
  np.testing.assert_allclose(result.embeddings, expected, **FLOAT16)
  np.testing.assert_allclose(result.uncond, _direct(tokenizer, model, [""], 24, False)[0],
                             **FLOAT16)
  # The plain prompt and a view-dependent one differ (the suffix is really appended).
  assert np.abs(result.embeddings[0, 0] - result.embeddings[0, 1]).max() > 1e-3

  # The cache file stores the texts; a second run is served from it without
  # loading the encoder, and a new prompt is encoded, not zero-filled.
  (cache_file,) = os.listdir(cache_dir)
  assert cache_file.startswith("text_clip-sd-")
  with np.load(os.path.join(cache_dir, cache_file)) as data:
    assert sorted(data["texts"].tolist()) == sorted(texts + [""])
  cache = text.EmbeddingCache("clip", folder, cache_dir)
  np.testing.assert_array_equal(cache.lookup(texts[:3]), result.embeddings[0, :3])
  assert cache.num_encoded == 0 and cache._encoder is None
  new = cache.lookup(["a blue cube, side view"])
  assert cache.num_encoded == 1
  np.testing.assert_allclose(new, _direct(tokenizer, model, ["a blue cube, side view"], 24, False),
                             **FLOAT16)
  assert len(text.EmbeddingCache("clip", folder, cache_dir).lookup(texts)) == len(texts)

  # A corrupt cache file is recomputed, not trusted.
  with open(os.path.join(cache_dir, cache_file), "wb") as f:
    f.write(b"not a zip file")
  cache = text.EmbeddingCache("clip", folder, cache_dir)
  np.testing.assert_array_equal(cache.lookup(texts[:2]), result.embeddings[0, :2])
  assert cache.num_encoded == 2


def test_clip_penultimate_uses_second_to_last_layer_and_own_cache(tmp_path):
  folder, cache_dir = str(tmp_path / "sd2"), str(tmp_path / "cache")
  tokenizer, model = _save_tiny_clip(folder)
  result = encode_prompts("clip_penultimate", folder, PROMPTS[:1], cache_dir, suffixes=("",))
  expected = _direct(tokenizer, model, PROMPTS[:1], 24, False, hidden_layer=-2)
  np.testing.assert_allclose(result.embeddings[:, 0], expected, **FLOAT16)
  assert np.abs(result.embeddings[0, 0] - _direct(tokenizer, model, PROMPTS[:1], 24, False)[0]
                ).max() > 1e-3
  # Another encoder kind on the same folder never reads this cache.
  encode_prompts("clip", folder, PROMPTS[:1], cache_dir, suffixes=("",))
  assert len(os.listdir(cache_dir)) == 2


def test_t5_embeddings_match_transformers(tmp_path):
  folder = str(tmp_path / "if")
  tokenizer, model = _save_tiny_t5(folder)
  result = encode_prompts("t5", folder, PROMPTS, str(tmp_path / "cache"),
                               negative_prompt="blue")
  texts = [(p + s).lower() for p in PROMPTS for s in VIEW_SUFFIXES]
  expected = _direct(tokenizer, model, texts, text.T5_MAX_LENGTH, mask=True)
  assert result.embeddings.shape == (2, len(VIEW_SUFFIXES), text.T5_MAX_LENGTH, 32)
  np.testing.assert_allclose(result.embeddings.reshape(expected.shape), expected, **FLOAT16)
  np.testing.assert_allclose(result.uncond, _direct(tokenizer, model, ["blue"], 77, True)[0],
                             **FLOAT16)


def test_bad_inputs_are_explained(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match="--config.guidance.text_encoder_path.*tokenizer/.*text_encoder/"):
    encode_prompts("clip", str(tmp_path / "nowhere"), PROMPTS, str(tmp_path))
  with pytest.raises(ValueError, match=r"prompt 1 is empty or whitespace \('   '\)"):
    encode_prompts("clip", str(tmp_path / "nowhere"), ["a cube", "   "], str(tmp_path))
  with pytest.raises(ValueError, match="unknown text encoder kind 'bert'.*clip"):
    text.EmbeddingCache("bert", str(tmp_path), str(tmp_path))


def test_encoder_placement_batches_and_half_precision(tmp_path, capsys, monkeypatch):
  """On this CPU the encoders run in float32; a GPU gets bfloat16 (T5) / float16 (CLIP),
  tried here on the CPU with the tiny T5 in bfloat16: close to float32 at bf16's 8
  significant bits. More than one batch of misses shows a progress bar."""
  assert text.default_placement("t5") == ("cpu", torch.float32)
  folder = str(tmp_path / "if")
  tokenizer, model = _save_tiny_t5(folder)
  texts = [f"prompt number {i}" for i in range(5)]
  expected = _direct(tokenizer, model, texts, text.T5_MAX_LENGTH, mask=True)
  bf16 = text.TextEncoder("t5", folder, dtype=torch.bfloat16)
  assert bf16.model.dtype == torch.bfloat16 and bf16.device == "cpu"
  got = bf16(texts)
  assert got.dtype == np.float32
  error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
  assert 0 < error < 0.02, error

  monkeypatch.setattr(text, "_ENCODE_BATCH", 2)
  cache = text.EmbeddingCache("t5", folder, str(tmp_path / "cache"))
  np.testing.assert_allclose(cache.lookup(texts), expected, **FLOAT16)
  assert "encoding 5 texts (t5, cpu, float32)" in capsys.readouterr().err
  (cache_file,) = os.listdir(tmp_path / "cache")
  with np.load(tmp_path / "cache" / cache_file) as data:
    assert data["embeddings"].dtype == np.float16
