"""Prompt data: the prompt set, its text tables, and each step's batch.

    config.prompts -> PromptSet (train / held-out prompts)
      -> PromptTables (per prompt: mapping embedding, one conditioning per view caption)
      -> sample_batch(config, tables, step): B rows of k prompts, a pure function
         of (config.seed, step), so a resumed run sees exactly the batches an
         uninterrupted one would.

The Dirichlet mixing weights and the guidance weights come from
`amortize/interpolation.py` (`sample_weights`, `sample_guidance_weight`), the
functions its tests check.
"""

import collections
import concurrent.futures
import pathlib
import threading
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import ml_collections
import numpy as np

from att3d_jax import real_prompts
from att3d_jax.amortize import interpolation
from att3d_jax.amortize import mapping as mapping_lib
from att3d_jax.guidance import base as guidance_base
from att3d_jax.nerf import cameras as cameras_lib
from att3d_jax.shapes import prompt_sets

NUM_VIEWS = len(cameras_lib.VIEW_LABELS)
INTERPOLATION_KINDS = ("none", "embedding", "loss")
# Keys of the data stream (the train step's randomness uses 1).
_DATA_STREAM = 2


# Texts per guidance call. Encoders round differently at different batch shapes
# (MiniLM on XLA CPU: a few ulps between batches of 1 and 256), so every text is
# encoded in a batch of exactly this many (the last one padded by repeating its
# last text); a row's value then never depends on which rows were asked with it,
# in what order, or whether it was evicted and encoded again. 32 captions are
# one step's 8 prompts x 4 views; 8 prompts one step's embeddings.
CAPTION_CHUNK = 32
PROMPT_CHUNK = 8
# Text standardization statistics (amortize/model.py `text_normalization`) come
# from at most this many training prompts, evenly spaced in the prompt list (all
# of them below it): encoding all 100k prompts' embeddings at start-up would take
# minutes. tests/test_prompt_data.py bounds the error against the full set.
NORMALIZATION_SAMPLE = 512
DEFAULT_TEXT_CACHE_MB = 512  # config.prompts.text_cache_mb when a config lacks it


class PromptTables(NamedTuple):
  """Host-side text tables of a prompt list.

  `embedding` and `conditioning` are either numpy arrays (`prompt_tables`) or
  `LazyRows` (`lazy_prompt_tables`) that encode rows on first use; both index
  alike: `table[rows]` with int rows of any shape [...] -> [..., *row_shape].
  """

  prompts: list[str]
  embedding: "np.ndarray | LazyRows"  # [P, D] float32, the mapping network's text input
  conditioning: "np.ndarray | LazyRows"  # [P, NUM_VIEWS, L, D] float16, one per view caption


def _encode_chunked(function: Callable[[list[str]], np.ndarray], texts: list[str],
                    chunk: int) -> np.ndarray:
  """function(texts) [N, ...], computed `chunk` texts per call (see CAPTION_CHUNK)."""
  outputs = []
  for start in range(0, len(texts), chunk):
    batch = texts[start:start + chunk]
    outputs.append(np.asarray(function(batch + batch[-1:] * (chunk - len(batch))))[:len(batch)])
  return np.concatenate(outputs)


def _view_captions(prompts: Sequence[str]) -> list[str]:
  return [p + cameras_lib.view_suffix(v) for p in prompts for v in cameras_lib.VIEW_LABELS]


def _validate(prompts: Sequence[str]) -> None:
  if not prompts:
    raise ValueError("empty prompt list")


def encode_embeddings(guidance: guidance_base.Guidance, prompts: Sequence[str]) -> np.ndarray:
  """prompts [N] -> mapping embeddings [N, D] float32."""
  return _encode_chunked(guidance.embed, list(prompts), PROMPT_CHUNK).astype(np.float32)


def encode_conditionings(guidance: guidance_base.Guidance,
                         prompts: Sequence[str]) -> np.ndarray:
  """prompts [N] -> view-caption conditionings [N, NUM_VIEWS, L, D] float16."""
  conditioning = _encode_chunked(guidance.encode, _view_captions(prompts),
                                 CAPTION_CHUNK).astype(np.float16)
  return conditioning.reshape((len(prompts), NUM_VIEWS) + conditioning.shape[1:])


def prompt_tables(guidance: guidance_base.Guidance, prompts: list[str]) -> PromptTables:
  """The guidance model's embedding and view-caption conditionings of `prompts`,
  all encoded now (P x 5 texts: minutes for thousands of prompts; training uses
  `lazy_prompt_tables`, whose rows are equal to these)."""
  _validate(prompts)
  return PromptTables(list(prompts), encode_embeddings(guidance, prompts),
                      encode_conditionings(guidance, prompts))


class TextCache:
  """A least-recently-used cache of encoded rows, bounded in bytes, shared by
  every lazy table of a run (train and held-out) and safe across threads.

  Keys are (table kind, prompt text), so a prompt in two tables is stored once.
  """

  def __init__(self, max_bytes: int):
    if max_bytes <= 0:
      raise ValueError(f"text cache of {max_bytes} bytes: --config.prompts.text_cache_mb "
                       "must be positive")
    self.max_bytes = max_bytes
    self.nbytes = 0  # bytes of the rows held now
    self.num_encoded = 0  # rows encoded (misses), evictions included
    self._rows: collections.OrderedDict[tuple[str, str], np.ndarray] = (
        collections.OrderedDict())
    self.lock = threading.Lock()  # held while looking up and encoding

  def __len__(self) -> int:
    return len(self._rows)

  def __contains__(self, key: tuple[str, str]) -> bool:
    """Whether the row (table kind, prompt) is held now."""
    with self.lock:
      return key in self._rows

  def get(self, kind: str, prompts: Sequence[str],
          encode: Callable[[list[str]], np.ndarray]) -> list[np.ndarray]:
    """The rows of `prompts` of table `kind`, encoding the missing ones with
    encode(missing prompts) -> [M, *row_shape] (under the lock)."""
    with self.lock:
      found = {p: self._rows.get((kind, p)) for p in prompts}
      missing = [p for p, row in found.items() if row is None]
      if missing:
        found.update(zip(missing, encode(missing)))
        self.num_encoded += len(missing)
      for prompt, row in found.items():  # most recently used last
        key = (kind, prompt)
        if key in self._rows:
          self._rows.move_to_end(key)
        else:
          self._rows[key] = row
          self.nbytes += row.nbytes
      while self.nbytes > self.max_bytes and len(self._rows) > 1:
        _, evicted = self._rows.popitem(last=False)
        self.nbytes -= evicted.nbytes
      return [found[p] for p in prompts]


class LazyRows:
  """An array-like [P, *row_shape] of per-prompt text rows, encoded on first use
  and kept in a shared `TextCache`.

  `rows[index]` takes an int (ndarray, list, scalar) of any shape [...] or a
  slice and returns np.ndarray [..., *row_shape] of `dtype`; `np.asarray(rows)`
  encodes every row (only for small tables).
  """

  def __init__(self, kind: str, prompts: list[str],
               encode: Callable[[list[str]], np.ndarray], cache: TextCache):
    self.kind = kind
    self.prompts = prompts
    self._encode = encode
    self.cache = cache
    self._row = None  # row 0: fixes row_shape and dtype on first use

  def _first_row(self) -> np.ndarray:
    if self._row is None:
      self._row = self.cache.get(self.kind, self.prompts[:1], self._encode)[0]
    return self._row

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.prompts),) + self._first_row().shape

  @property
  def dtype(self) -> np.dtype:
    return self._first_row().dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return len(self.prompts)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice):
      index = np.arange(len(self.prompts))[index]
    index = np.asarray(index)
    if not np.issubdtype(index.dtype, np.integer):
      raise TypeError(f"{self.kind} rows are indexed by ints or a slice, got {index.dtype}")
    flat = np.where(index < 0, index + len(self.prompts), index).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= len(self.prompts)):
      raise IndexError(f"{self.kind} row index out of range for {len(self.prompts)} prompts")
    if not flat.size:
      return np.zeros(index.shape + self.shape[1:], self.dtype)
    unique, inverse = np.unique(flat, return_inverse=True)
    rows = np.stack(self.cache.get(self.kind, [self.prompts[i] for i in unique],
                                   self._encode))
    return rows[inverse.reshape(-1)].reshape(index.shape + rows.shape[1:])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy
    rows = self[np.arange(len(self.prompts))]
    return rows if dtype is None else rows.astype(dtype)


def lazy_prompt_tables(guidance: guidance_base.Guidance, prompts: list[str],
                       cache: TextCache) -> PromptTables:
  """`prompt_tables(guidance, prompts)` whose rows are encoded when first indexed
  and kept in `cache`: start-up costs nothing per prompt and host memory is
  bounded by the cache, not by prompts x views x tokens. Row values equal
  `prompt_tables`' exactly (fixed encoding batches, see CAPTION_CHUNK)."""
  _validate(prompts)
  prompts = list(prompts)
  return PromptTables(
      prompts,
      LazyRows("embedding", prompts, lambda p: encode_embeddings(guidance, p), cache),
      LazyRows("conditioning", prompts, lambda p: encode_conditionings(guidance, p), cache))


def precompute(guidance: guidance_base.Guidance, prompts: Sequence[str]) -> None:
  """Encodes every view caption and prompt of `prompts` in one call each, results
  dropped: for guidance whose encode/embed read a disk cache (guidance/text.py's
  EmbeddingCache, which rewrites its whole file after each call with misses), one
  write at start-up instead of one per lazily encoded batch; the lazy rows then
  read that cache."""
  guidance.encode(_view_captions(prompts))
  guidance.embed(list(prompts))


def text_cache(config: ml_collections.ConfigDict) -> TextCache:
  """The run's cache of text rows, config.prompts.text_cache_mb megabytes."""
  return TextCache(int(config.prompts.get("text_cache_mb", DEFAULT_TEXT_CACHE_MB) * 2**20))


def normalization_rows(num_prompts: int) -> np.ndarray:
  """The training rows whose embeddings fix the text standardization: all of them
  up to NORMALIZATION_SAMPLE, else that many evenly spaced ones [N] int."""
  if num_prompts <= NORMALIZATION_SAMPLE:
    return np.arange(num_prompts)
  return np.unique(np.linspace(0, num_prompts - 1, NORMALIZATION_SAMPLE).round().astype(int))


_PREFETCH = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="text_prefetch")


def prefetch(tables: PromptTables, index: np.ndarray) -> Optional[concurrent.futures.Future]:
  """Encodes the lazy rows `index` (int, any shape) into the cache on a background
  thread (None for eager tables). Only warms the cache: an error there reappears
  where the rows are read."""
  lazy = [t for t in (tables.embedding, tables.conditioning) if isinstance(t, LazyRows)]
  if not lazy:
    return None
  return _PREFETCH.submit(lambda: [t[index] for t in lazy])


def load_prompts(config: ml_collections.ConfigDict) -> prompt_sets.PromptSet:
  """The config's prompts: config.prompts.file (one prompt per line, all
  trained, none held out) if set, else the named set: a shapes-world set or a
  real one (DF27, Pig64, animals) at config.prompts.split."""
  if config.prompts.get("file"):
    path = pathlib.Path(config.prompts.file).expanduser()
    prompts = real_prompts.read_prompt_file(path)
    if not prompts:
      raise ValueError(f"--config.prompts.file={config.prompts.file!r} holds no prompts; "
                       "write one prompt per line")
    return prompt_sets.PromptSet(name=str(path), train=prompts, heldout=[])
  if config.prompts.set in prompt_sets.PROMPT_SETS:
    return prompt_sets.load_prompt_set(config.prompts.set, config.prompts.split)
  if config.prompts.set in real_prompts.PROMPT_SETS:
    return real_prompts.load_prompt_set(config.prompts.set, config.prompts.split)
  raise ValueError(f"unknown prompt set {config.prompts.set!r}; available: "
                   f"{list(prompt_sets.PROMPT_SETS) + list(real_prompts.PROMPT_SETS)}, "
                   "or pass --config.prompts.file=<one prompt per line>")


def num_mixed(config: ml_collections.ConfigDict) -> int:
  """k: prompts per batch row (1 without interpolation training)."""
  kind = config.interpolation.kind
  if kind not in INTERPOLATION_KINDS:
    raise ValueError(f"unknown interpolation kind {kind!r}; expected one of "
                     f"{INTERPOLATION_KINDS}")
  if kind != "none" and not mapping_lib.mapping_class(config.mapping.kind).generalizes:
    raise ValueError("interpolation training needs a mapping network that reads the "
                     f"embedding; mapping.kind {config.mapping.kind!r} ignores it")
  return 1 if kind == "none" else config.interpolation.num_prompts


def scale_column(config: ml_collections.ConfigDict, scale: np.ndarray) -> np.ndarray:
  """The CFG weight as the mapping's extra input, mapped to [0, 1] over its range."""
  low, high = config.guidance.scale_range
  return ((scale - low) / max(high - low, 1e-6)).astype(np.float32)


def mapping_inputs(config: ml_collections.ConfigDict, embedding: np.ndarray,
                   scale: Optional[np.ndarray] = None) -> np.ndarray:
  """embedding [N, D] (+ CFG weight [N] when amortized) -> mapping input [N, D(+1)]."""
  if not config.guidance.amortize_scale:
    return embedding.astype(np.float32)
  if scale is None:
    scale = np.full((len(embedding),), config.guidance.scale, np.float32)
  return np.concatenate([embedding, scale_column(config, scale)[:, None]], axis=1)


def _step_keys(config: ml_collections.ConfigDict, step: int) -> list[jax.Array]:
  """(index, mixed, alpha, scale) keys of `step`'s batch."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), _DATA_STREAM),
                           step)
  return list(jax.random.split(key, 4))


def batch_index(config: ml_collections.ConfigDict, num_prompts: int, step: int) -> np.ndarray:
  """The prompts of `step`'s batch [B, k] int: row b mixes prompts index[b]."""
  rows, k = config.batch.prompts_per_step, num_mixed(config)
  index_key = _step_keys(config, step)[0]
  if config.batch.without_replacement:  # every prompt at most once per step
    if rows > num_prompts or k > 1:
      raise ValueError(f"batch.without_replacement draws batch.prompts_per_step={rows} "
                       f"distinct prompts of {num_prompts}, one per row: needs "
                       "at most that many rows and interpolation.kind='none'")
    return np.asarray(jax.random.permutation(index_key, num_prompts))[:rows, None]
  return np.asarray(jax.random.randint(index_key, (rows, k), 0, num_prompts))


def annealed_guidance_scale(config: ml_collections.ConfigDict, step: int) -> float:
  """The fixed CFG weight at `step`: config.guidance.scale, annealed linearly to
  config.guidance.scale_final over train.num_steps when that is > 0.

  CFG inflates silhouettes, more so the higher the weight (docs/results/compositional_scale.md,
  "The halo is classifier-free guidance"): a high weight early learns the prompt's
  factors, a lower one late lets the silhouettes settle nearer the true size.
  """
  start, final = config.guidance.scale, config.guidance.get("scale_final", 0.0)
  if final <= 0:
    return float(start)
  if config.guidance.amortize_scale:
    raise ValueError(f"--config.guidance.scale_final={final} anneals the fixed CFG weight, but "
                     "guidance.amortize_scale samples it per row from guidance.scale_range; "
                     "set scale_final=0 or amortize_scale=False")
  fraction = min(max(step / config.train.num_steps, 0.0), 1.0)
  return float(start + (final - start) * fraction)


def sample_batch(config: ml_collections.ConfigDict, tables: PromptTables, step: int) -> dict:
  """The batch of `step`: B rows of k prompts each, drawn from (seed, step) alone.

  With lazy tables, also starts encoding step + 1's prompts in the background
  (`prefetch`), so that the train loop's next call finds them cached.

  Returns numpy arrays:
    prompt_index [B] int32: each row's first prompt (per-prompt grids use it);
    mapping_input [B, D(+1)]: alpha-mixed embedding (+ the CFG weight column);
    alpha [B, k]: mixing weights, one-hot for rows without interpolation;
    conditioning [B, k, NUM_VIEWS, L, D] float32;
    guidance_scale [B] float32.
  """
  rows, k = config.batch.prompts_per_step, num_mixed(config)
  _, mixed_key, alpha_key, scale_key = _step_keys(config, step)
  index = batch_index(config, len(tables.prompts), step)
  alpha = np.zeros((rows, k), np.float32)
  alpha[:, 0] = 1.0
  if k > 1:
    mixed = np.asarray(jax.random.uniform(mixed_key, (rows,))) < config.interpolation.fraction
    weights = np.asarray(interpolation.sample_weights(alpha_key, k, config.interpolation.kappa,
                                                      rows))
    alpha = np.where(mixed[:, None], weights, alpha)
  fixed_scale = annealed_guidance_scale(config, step)  # also refuses a schedule with amortize_scale
  if config.guidance.amortize_scale:
    scale = np.asarray(interpolation.sample_guidance_weight(scale_key, rows,
                                                            *config.guidance.scale_range))
  else:
    scale = np.full((rows,), fixed_scale, np.float32)
  embedding = np.einsum("bk,bkd->bd", alpha, tables.embedding[index])
  conditioning = tables.conditioning[index].astype(np.float32)
  if isinstance(tables.conditioning, LazyRows):
    prefetch(tables, batch_index(config, len(tables.prompts), step + 1))
  return {"prompt_index": index[:, 0].astype(np.int32),
          "mapping_input": mapping_inputs(config, embedding, scale),
          "alpha": alpha,
          "conditioning": conditioning,
          "guidance_scale": scale}
