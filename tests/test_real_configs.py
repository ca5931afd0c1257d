"""Real-model ATT3D: prompt sets, configs, IF / SD guidance and CLIP evaluation.

Every model is a tiny random one built here in diffusers / transformers layout
(nothing is downloaded): an IF-style pixel UNet with a T5 encoder, an SD-style
latent UNet with a VAE and a CLIP text encoder, and a CLIP model for evaluation.
"""

import json
import os

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from att3d_jax import build as build_lib
from att3d_jax import real_prompts
from att3d_jax import train
from att3d_jax.eval import clip_eval
from att3d_jax.guidance import real
from configs import animals as animals_config
from configs import df27 as df27_config
from configs import pig64 as pig64_config

import test_text
import test_train
import test_unet_parity
import test_vae_parity

IF_UNET = dict(test_unet_parity.CONFIGS["if"], encoder_hid_dim=32)  # tiny T5 width
SD_UNET = dict(test_unet_parity.CONFIGS["sd1"], sample_size=8)  # 8x8 latents = 16x16 pixels
IMAGE_SIZE = 16  # render size in these tests


def _save_pipeline(folder, unet_config, beta_schedule):
  torch.manual_seed(0)
  diffusers.UNet2DConditionModel(**unet_config).save_pretrained(os.path.join(folder, "unet"))
  diffusers.DDPMScheduler(beta_schedule=beta_schedule).save_pretrained(
      os.path.join(folder, "scheduler"))


@pytest.fixture(scope="module")
def if_folder(tmp_path_factory):
  """IF stage I layout: unet/ (3 -> 6 channels), scheduler/, T5 tokenizer/ + text_encoder/."""
  folder = str(tmp_path_factory.mktemp("tiny_if"))
  _save_pipeline(folder, IF_UNET, "squaredcos_cap_v2")
  test_text._save_tiny_t5(folder)  # pylint: disable=protected-access
  return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  """SD layout: unet/ (4 latent channels), vae/, scheduler/, CLIP tokenizer/ + text_encoder/."""
  folder = str(tmp_path_factory.mktemp("tiny_sd"))
  _save_pipeline(folder, SD_UNET, "scaled_linear")
  test_vae_parity._save_random_vae(folder)  # pylint: disable=protected-access
  test_text._save_tiny_clip(folder)  # pylint: disable=protected-access
  return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """A tiny CLIPModel + CLIPProcessor saved flat, like openai/clip-vit-large-patch14."""
  folder = tmp_path_factory.mktemp("tiny_clip")
  tokenizer, _ = test_text._save_tiny_clip(str(folder / "text"))  # pylint: disable=protected-access
  torch.manual_seed(2)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8),
      projection_dim=16)
  transformers.CLIPModel(config).eval().save_pretrained(folder / "clip")
  image_processor = transformers.CLIPImageProcessor(
      size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer
                             ).save_pretrained(folder / "clip")
  return str(folder / "clip")


def _tiny_run_config(config, model_folder, clip_path, cache_dir):
  """A :quick config on the tiny models, at 16x16 with few eval views."""
  config.guidance.path = config.guidance.text_encoder_path = model_folder
  config.guidance.cache_dir = str(cache_dir)
  config.eval.clip_path = clip_path
  config.camera.height = config.camera.width = IMAGE_SIZE
  config.eval.elevations_deg = (20.0,)
  config.eval.views_per_elevation = 2
  config.eval.write_outputs = False
  config.train.progress_bar = False
  return config


# ---------------------------------------------------------------------------
# Prompt sets.


def test_committed_prompt_files_match_the_generator():
  for relative_path, expected in real_prompts.generate_prompt_files().items():
    path = real_prompts.PROMPTS_DIR / relative_path
    assert path.read_text() == expected, (
        f"{path} is stale; run `python -m att3d_jax.real_prompts`")


def test_prompt_set_sizes_and_splits():
  df27 = real_prompts.load_prompt_set("df27")
  assert (len(df27.train), len(df27.heldout)) == (27, 0)
  pig = real_prompts.load_prompt_set("pig64")
  assert (len(pig.train), len(pig.heldout)) == (56, 8)
  assert "a pig riding a bicycle made out of gold" in pig.heldout  # the diagonal
  assert "a pig riding a bicycle carved out of wood" in pig.train
  splits = {split: real_prompts.load_prompt_set("animals", split)
            for split in ("12.5%", "50%", "100%")}
  assert [len(s.train) for s in splits.values()] == [300, 1200, 2400]
  full = splits["100%"].train
  assert splits["12.5%"].train == full[:300] and splits["50%"].train == full[:1200]
  heldout = splits["12.5%"].heldout
  assert len(heldout) == 120 and not set(heldout) & set(full)
  assert sorted(full + heldout) == sorted(real_prompts.animal_prompts())


@pytest.mark.parametrize("contents, message", [
    ("a cat\n\na dog\n", r"train.txt:2: blank line"),
    ("# header\na cat\n a dog\n", r"train.txt:3: blank line or surrounding whitespace"),
    ("a cat\na dog \n", r"train.txt:2: .*whitespace"),
    ("a cat\na dog\na cat\n", r"train.txt:3: duplicate prompt 'a cat' \(first on line 1\)"),
])
def test_malformed_prompt_files_name_file_and_line(tmp_path, contents, message):
  (tmp_path / "pig64").mkdir()
  (tmp_path / "pig64" / "train.txt").write_text(contents)
  (tmp_path / "pig64" / "heldout.txt").write_text("a pig\n")
  with pytest.raises(ValueError, match=message):
    real_prompts.load_prompt_set("pig64", directory=tmp_path)


def test_unknown_or_empty_prompt_sets_are_explained(tmp_path):
  with pytest.raises(ValueError, match=r"unknown split '50%' of prompt set 'pig64'; "
                                       r"available: \['100%'\]"):
    real_prompts.load_prompt_set("pig64", "50%")
  with pytest.raises(ValueError, match=r"unknown prompt set 'dogs'; available: \['df27'"):
    real_prompts.load_prompt_set("dogs")
  (tmp_path / "df27").mkdir()
  (tmp_path / "df27" / "train.txt").write_text("# only a comment\n")
  with pytest.raises(ValueError, match="holds no prompts"):
    real_prompts.load_prompt_set("df27", directory=tmp_path)
  with pytest.raises(ValueError, match=r"heldout.txt is missing"):
    (tmp_path / "df27" / "train.txt").write_text("a cat\n")
    real_prompts.load_prompt_set("df27", directory=tmp_path)


# ---------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("module", [df27_config, pig64_config, animals_config])
def test_configs_share_the_train_fields_and_reject_unknown_args(module):
  config, quick = module.get_config(), module.get_config("quick")
  assert config.guidance.kind == "if" and config.guidance.path == ""
  assert config.eval.kind == "clip" and config.eval.clip_path == ""
  assert (config.camera.height, config.camera.width) == (64, 64)
  assert config.camera.elevation_range_deg == (-10.0, 90.0)
  hashgrid = config.hashgrid
  # configs/real.py documents the hypernet's output layer as 32 x 1,048,576.
  assert hashgrid.num_levels * 2**hashgrid.log2_table_size * hashgrid.features_per_level == 2**20
  assert quick.train.num_steps == 2
  assert quick.prompts.split in real_prompts.PROMPT_SETS[quick.prompts.set]
  assert set(quick.to_dict()) == set(config.to_dict())
  with pytest.raises(ValueError, match="unknown config argument 'fast'"):
    module.get_config("fast")


# ---------------------------------------------------------------------------
# Guidance loading.


def test_missing_folders_name_the_flag(tmp_path, if_folder):
  config = df27_config.get_config("quick")
  config.guidance.cache_dir = str(tmp_path / "cache")
  with pytest.raises(ValueError, match=r"--config.guidance.path is not set: pass a local "
                                       r"DeepFloyd IF stage-I diffusers folder"):
    build_lib.load_guidance(config)
  config.guidance.kind = "sd"
  with pytest.raises(ValueError, match=r"--config.guidance.path is not set: .*Stable Diffusion"):
    build_lib.load_guidance(config)
  config.guidance.kind = "if"
  config.guidance.path = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"--config.guidance.path=.*nowhere.* not a folder"):
    build_lib.load_guidance(config)
  config.guidance.path = if_folder
  with pytest.raises(ValueError, match=r"--config.guidance.text_encoder_path is not set"):
    build_lib.load_guidance(config)
  config.guidance.text_encoder_path = str(tmp_path)  # no tokenizer/, text_encoder/
  with pytest.raises(FileNotFoundError, match=r"missing \['tokenizer', 'text_encoder'\].*"
                                              r"--config.guidance.text_encoder_path"):
    build_lib.load_guidance(config)
  config.guidance.text_encoder_path = if_folder
  config.guidance.kind = "sd"  # a pixel UNet is not a latent one
  with pytest.raises(ValueError, match=r"takes 3 input channels.*--config.guidance.kind"):
    build_lib.load_guidance(config)
  config.guidance.text_encoder_kind = "t5"  # SD takes CLIP embeddings
  with pytest.raises(ValueError, match=r"text_encoder_kind='t5'; Stable Diffusion takes"):
    real.text_encoder_kind(config)
  config.guidance.kind = "if"
  config.guidance.dtype = "float16"
  with pytest.raises(ValueError, match=r"--config.guidance.dtype='float16'; use one of"):
    build_lib.load_guidance(config)
  config.guidance.dtype = "float32"
  config.guidance.attention = "flash"
  with pytest.raises(ValueError, match=r"--config.guidance.attention='flash' is not"):
    build_lib.load_guidance(config)
  with pytest.raises(ValueError, match=r"--config.eval.clip_path is not set"):
    clip_eval.score_prompts(["a cat"], np.zeros((1, 1, 8, 8, 3)), "")
  with pytest.raises(FileNotFoundError, match=r"--config.eval.clip_path=.*no config.json"):
    clip_eval.check_clip_path(str(tmp_path))


def test_if_guidance_embeddings_and_inputs(tmp_path, if_folder):
  config = df27_config.get_config("quick")
  config.guidance.path = config.guidance.text_encoder_path = if_folder
  config.guidance.cache_dir = str(tmp_path / "cache")
  guidance = build_lib.load_guidance(config)
  prompts = ["a red cube", "A Blue sphere wearing a red hat"]
  tokens = guidance.encode(prompts)
  assert tokens.shape == (2, 77, 32) and guidance.uncond.shape == (1, 77, 32)
  # The mapping input is the mean over the prompt's valid T5 tokens (words + </s>).
  np.testing.assert_allclose(guidance.embed(prompts)[0], tokens[0, :4].mean(0), atol=1e-6)
  np.testing.assert_allclose(guidance.embed(prompts)[1], tokens[1, :8].mean(0), atol=1e-6)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    guidance.embed([" "])
  # Pixel input at the UNet's sample size; eps keeps IF's 6 (eps + variance) channels.
  images = jnp.full((2, 32, 32, 3), 0.5)
  x = guidance.model_input(images)
  assert x.shape == (2, 3, 16, 16)
  eps = guidance.eps_fn(x, jnp.array([10, 500], jnp.int32), jnp.asarray(tokens))
  assert eps.shape == (2, 6, 16, 16) and eps.dtype == jnp.float32
  assert guidance.alphas_cumprod.shape == (1000,)
  assert guidance.background_color == (1.0, 1.0, 1.0)


def test_sd_model_input_is_the_scaled_vae_posterior_mean(tmp_path, sd_folder):
  config = df27_config.get_config("quick")
  config.guidance.kind = "sd"
  config.guidance.path = config.guidance.text_encoder_path = sd_folder
  config.guidance.cache_dir = str(tmp_path / "cache")
  guidance = build_lib.load_guidance(config)
  images = np.random.default_rng(0).uniform(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(
      np.float32)
  vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(sd_folder, "vae")).eval()
  with torch.no_grad():
    pixels = torch.from_numpy(2.0 * images.transpose(0, 3, 1, 2) - 1.0)
    expected = vae.encode(pixels).latent_dist.mean.numpy() * vae.config.scaling_factor
  np.testing.assert_allclose(guidance.model_input(jnp.asarray(images)), expected, atol=1e-4)
  assert guidance.encode(["a cube"]).shape == (1, 24, 32)  # CLIP tokens
  assert guidance.embed(["a cube"]).shape == (1, 32)


# ---------------------------------------------------------------------------
# Training end to end.


def test_animals_quick_trains_on_tiny_if_and_writes_clip_eval(tmp_path, if_folder, clip_folder):
  config = _tiny_run_config(animals_config.get_config("quick"), if_folder, clip_folder,
                            tmp_path / "cache")
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  saved = json.loads((tmp_path / "run" / "eval.json").read_text())
  for split in ("train", "heldout"):
    assert set(saved[split]) == {"r_probability", "r_precision"}
    assert 0.0 < saved[split]["r_probability"] <= 1.0
  assert saved["num_train_prompts"] == 300
  assert results["train"] == saved["train"]
  records = [json.loads(line) for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2] and all(r["finite"] for r in records)


def test_df27_quick_trains_on_tiny_sd(tmp_path, sd_folder, clip_folder):
  config = _tiny_run_config(df27_config.get_config("quick"), sd_folder, clip_folder,
                            tmp_path / "cache")
  config.guidance.kind = "sd"
  config.guidance.scale = 100.0
  # Preempted after step 2: the loop saves and returns, before evaluation.
  result = test_train.train_until(config, str(tmp_path / "run"), 2)
  assert result == {"preempted": True, "step": 2}
  records = [json.loads(line) for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2]
  assert all(r["finite"] and r["sds_grad_norm"] > 0 for r in records)


# ---------------------------------------------------------------------------
# CLIP evaluation.


def test_clip_r_probability_matches_transformers(clip_folder):
  prompts = ["a red cube", "a blue sphere wearing a hat"]
  rgb = np.random.default_rng(0).uniform(size=(2, 3, 20, 20, 3)).astype(np.float32)
  rows = clip_eval.score_prompts(prompts, rgb, clip_folder)

  model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
  processor = transformers.CLIPProcessor.from_pretrained(clip_folder)
  images = list(clip_eval.to_uint8(rgb.reshape(6, 20, 20, 3)))
  inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True,
                     truncation=True)
  with torch.no_grad():
    probabilities = model(**inputs).logits_per_image.softmax(-1).numpy().reshape(2, 3, 2)
  assert np.ptp(probabilities) > 1e-3  # the renders are told apart at all
  for i, row in enumerate(rows):
    assert row["prompt"] == prompts[i]
    np.testing.assert_allclose(row["r_probability"], probabilities[i, :, i].mean(),
                               rtol=0, atol=1e-5)
    assert row["r_hit"] == np.mean(probabilities[i].argmax(-1) == i)
  summary = clip_eval.summarize(rows)
  np.testing.assert_allclose(summary["r_probability"],
                             np.mean([probabilities[i, :, i].mean() for i in range(2)]),
                             atol=1e-5)
  assert summary["r_precision"] == np.mean([row["r_hit"] for row in rows])
  # A larger candidate set lowers the correct prompt's probability.
  wider = clip_eval.score_prompts(prompts[:1], rgb[:1], clip_folder,
                                  candidates=prompts + ["a green cone"])
  assert wider[0]["r_probability"] < rows[0]["r_probability"]
