"""The persistent XLA compilation cache of the command-line tools.

A second `python -m att3d_jax.generate` (or a resumed training run) reads its
compiled programs from disk instead of compiling them again; the CLI row of
`python -m benchmarks.run_all` (docs/benchmarks.md) measures the saving. Programs that
compile in under `min_compile_seconds` are not worth a disk entry.
"""

import os

import jax

DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                           "att3d_jax", "xla")


def enable(cache_dir: str, min_compile_seconds: float = 0.2) -> None:
  """Turns the cache on at `cache_dir` (created if missing); "" leaves it off."""
  if not cache_dir:
    return
  cache_dir = os.path.expanduser(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
