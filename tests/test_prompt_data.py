"""Lazy text tables (prompt_data.lazy_prompt_tables): rows equal the eager
tables' whatever the request pattern, eviction and prefetching; the cache stays
within its byte budget; the sampled text standardization is close to the full one;
the batches' CFG weight follows guidance.scale_final's schedule."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from att3d_jax import prompt_data
from att3d_jax.guidance import base as guidance_base

LENGTH, WIDTH = 3, 4
PROMPTS = [f"a {color} {shape}" for color in ("red", "green", "blue", "gold")
           for shape in ("cube", "ball", "cone", "ring", "torus")]  # 20


class CountingEncoder:
  """Text -> fixed random vector, plus a perturbation that depends on the batch
  size (like XLA's rounding at different shapes), counting the texts it sees."""

  def __init__(self, shape):
    self.shape = shape
    self.calls = []  # batch sizes

  def __call__(self, texts):
    self.calls.append(len(texts))
    rows = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=self.shape)
            for t in texts]
    return (np.stack(rows) + 1e-3 * len(texts)).astype(np.float32)


def fake_guidance():
  return guidance_base.Guidance(
      eps_fn=None, alphas_cumprod=None, uncond=jnp.zeros((1, LENGTH, WIDTH)),
      model_input=None, encode=CountingEncoder((LENGTH, WIDTH)),
      embed=CountingEncoder((WIDTH,)), background_color=(0.0, 0.0, 0.0))


def row_bytes():
  return prompt_data.NUM_VIEWS * LENGTH * WIDTH * 2  # one conditioning row, float16


def test_lazy_rows_equal_eager_rows_for_any_request_pattern():
  guidance = fake_guidance()
  eager = prompt_data.prompt_tables(guidance, PROMPTS)
  assert eager.conditioning.shape == (20, prompt_data.NUM_VIEWS, LENGTH, WIDTH)
  assert eager.conditioning.dtype == np.float16 and eager.embedding.dtype == np.float32
  # Without fixed batches the perturbation would differ: the test can fail.
  direct = guidance.encode(prompt_data._view_captions(PROMPTS)).astype(np.float16)
  assert not np.array_equal(direct.reshape(eager.conditioning.shape), eager.conditioning)

  lazy = prompt_data.lazy_prompt_tables(fake_guidance(), PROMPTS, prompt_data.TextCache(2**20))
  assert lazy.conditioning.shape == eager.conditioning.shape
  assert lazy.embedding.shape == eager.embedding.shape and len(lazy.embedding) == 20
  for index in (np.array([[3, 17], [3, 0]]), np.array(5), [19, -1], np.arange(20)[::-3]):
    np.testing.assert_array_equal(lazy.conditioning[index], eager.conditioning[index])
    np.testing.assert_array_equal(lazy.embedding[index], eager.embedding[index])
  np.testing.assert_array_equal(lazy.embedding[2:7], eager.embedding[2:7])
  np.testing.assert_array_equal(np.asarray(lazy.conditioning), eager.conditioning)
  assert lazy.conditioning[np.zeros((0, 2), int)].shape == (0, 2) + eager.conditioning.shape[1:]
  with pytest.raises(IndexError):
    lazy.embedding[np.array([20])]
  with pytest.raises(TypeError):
    lazy.embedding[np.array([0.5])]


def test_eviction_keeps_rows_exact_and_memory_bounded():
  guidance = fake_guidance()
  eager = prompt_data.prompt_tables(guidance, PROMPTS)
  cache = prompt_data.TextCache(2 * row_bytes())  # two conditioning rows
  lazy = prompt_data.lazy_prompt_tables(fake_guidance(), PROMPTS, cache)
  conditioning = lazy.conditioning
  encoded = lambda: cache.num_encoded  # noqa: E731
  conditioning[np.array([0, 1])]
  assert encoded() == 2 and cache.nbytes == 2 * row_bytes()
  conditioning[np.array([0])]  # a hit, and 0 becomes the most recently used
  assert encoded() == 2
  conditioning[np.array([2])]  # evicts 1, the least recently used
  assert encoded() == 3 and cache.nbytes <= cache.max_bytes
  conditioning[np.array([0])]
  assert encoded() == 3
  conditioning[np.array([1])]  # evicted: encoded again
  assert encoded() == 4
  rng = np.random.default_rng(0)
  for _ in range(30):
    index = rng.integers(0, 20, size=(2, 3))
    np.testing.assert_array_equal(conditioning[index], eager.conditioning[index])
    assert cache.nbytes <= cache.max_bytes
  # A request larger than the cache is still answered in full.
  np.testing.assert_array_equal(conditioning[np.arange(20)], eager.conditioning)
  assert cache.nbytes <= cache.max_bytes and len(cache) <= 2


def test_cache_size_flag_is_checked():
  with pytest.raises(ValueError, match="text_cache_mb"):
    prompt_data.TextCache(0)


def test_lazy_batches_equal_eager_batches_and_prefetch_fills_the_cache():
  from tests import test_train  # pylint: disable=g-import-not-at-top
  config = test_train.quick_config(batch__prompts_per_step=4,
                                   interpolation__kind="embedding")
  guidance = test_train.oracle_guidance()
  prompts = prompt_data.load_prompts(config).train
  eager = prompt_data.prompt_tables(guidance, prompts)
  cache = prompt_data.TextCache(2**30)
  lazy = prompt_data.lazy_prompt_tables(guidance, prompts, cache)
  for step in (0, 1, 5):
    want, got = (prompt_data.sample_batch(config, t, step) for t in (eager, lazy))
    assert want.keys() == got.keys()
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  index = prompt_data.batch_index(config, len(prompts), 11)
  prompt_data.prefetch(lazy, index).result()
  # Every row step 11 reads is cached. (Counting encodes across sample_batch
  # would race with its own prefetch of step 12.)
  assert all((kind, prompts[i]) in cache for i in index.reshape(-1)
             for kind in ("embedding", "conditioning"))
  assert prompt_data.prefetch(eager, index) is None


def test_guidance_scale_anneals_linearly_to_scale_final():
  from tests import test_train  # pylint: disable=g-import-not-at-top
  config = test_train.quick_config(guidance__scale=5.0, guidance__scale_final=2.0,
                                   train__num_steps=8)
  tables = prompt_data.prompt_tables(test_train.oracle_guidance(),
                                     prompt_data.load_prompts(config).train)
  rows = config.batch.prompts_per_step
  for step, want in ((0, 5.0), (2, 4.25), (4, 3.5), (8, 2.0), (12, 2.0)):
    np.testing.assert_allclose(prompt_data.sample_batch(config, tables, step)["guidance_scale"],
                               np.full((rows,), want, np.float32), err_msg=f"step {step}")
  config.guidance.scale_final = 0.0  # constant
  np.testing.assert_array_equal(prompt_data.sample_batch(config, tables, 4)["guidance_scale"],
                                np.full((rows,), 5.0, np.float32))
  config.guidance.scale_final = 2.0
  config.guidance.amortize_scale = True  # the weight is sampled: a schedule would be ignored
  with pytest.raises(ValueError, match="scale_final"):
    prompt_data.sample_batch(config, tables, 0)


def test_normalization_rows():
  np.testing.assert_array_equal(prompt_data.normalization_rows(5), np.arange(5))
  rows = prompt_data.normalization_rows(100_000)
  assert len(rows) == prompt_data.NORMALIZATION_SAMPLE
  assert rows[0] == 0 and rows[-1] == 99_999 and np.all(np.diff(rows) > 0)


@pytest.mark.slow  # ~1 min: 2000 MiniLM embeddings on the 2-core CPU
def test_sampled_text_normalization_is_close_to_the_full_one():
  """shapes_2400's 2000 training prompts, real MiniLM embeddings: the sample's
  mean is within 0.1 standardized units (RMS over coordinates) of the full
  mean, its scale within 5%; and lazy rows equal eager ones for this encoder."""
  from att3d_jax import build  # pylint: disable=g-import-not-at-top
  from att3d_jax.amortize import model as model_lib  # pylint: disable=g-import-not-at-top
  from configs import shapes  # pylint: disable=g-import-not-at-top
  config = shapes.get_config()
  config.prompts.set = "shapes_2400"
  guidance = build.load_guidance(config)
  prompts = prompt_data.load_prompts(config).train
  lazy = prompt_data.lazy_prompt_tables(guidance, prompts, prompt_data.TextCache(2**30))
  full = model_lib.text_normalization(np.asarray(lazy.embedding))
  sample = model_lib.text_normalization(
      lazy.embedding[prompt_data.normalization_rows(len(prompts))])
  shift = np.sqrt(np.mean(np.square((sample["mean"] - full["mean"]) * full["scale"])))
  assert shift < 0.1, shift
  assert abs(float(sample["scale"] / full["scale"]) - 1) < 0.05
  rows = np.array([3, 1500, 77])
  eager = prompt_data.prompt_tables(guidance, [prompts[i] for i in rows])
  np.testing.assert_array_equal(lazy.conditioning[rows], eager.conditioning)
  np.testing.assert_array_equal(lazy.embedding[rows], eager.embedding)
