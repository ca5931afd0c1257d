r"""Start-up time and host text memory of a shapes training run at 3200 and 100k prompts.

    python -m benchmarks.startup [--sizes 3200 100000] [--code_dir DIR] [--out /tmp/startup]

For each size, writes a prompts file (3200: all shapes-grammar prompts,
`scenes.all_prompts()`; more: `synthetic_prompts`), launches

    python -m att3d_jax.main --config=configs/shapes.py --config.prompts.file=<file>
        --config.train.log_every=1 --compilation_cache= ...

with --code_dir's att3d_jax on PYTHONPATH (default: this checkout; pass another
checkout to time its code the same way), and times launch -> the first line of
metrics.jsonl (step 1 done; the persistent compilation cache is off: a cold
start). The child's resident memory (VmRSS) at that moment is recorded, then
the child is killed. Then, in this process (this checkout's code), the text
tables alone: bytes the lazy tables hold after the first step (the text
standardization sample, step 0's batch, step 1's prefetch) and after
--fill_steps more steps' batches, the RSS growth over that, and what eager
tables (every prompt's 4 view conditionings [4, 25, 384] float16 + embedding
[384] float32) would hold. One JSON line per size; the last line is all of them.
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
# Words appended to the grammar's 3200 prompts to make more distinct ones.
EXTRA_WORDS = ("weathered", "glossy", "matte", "tiny", "huge", "ancient", "modern", "rusty",
               "wooden", "glass", "marble", "striped", "dotted", "fuzzy", "shiny", "dusty",
               "frozen", "burning", "floating", "sleeping", "dancing", "broken", "golden",
               "silver", "paper", "plastic", "velvet", "neon", "pastel", "cracked", "hollow",
               "twisted")


def synthetic_prompts(count: int) -> list[str]:
  """`count` distinct prompts: the grammar's 3200, then each again with one of
  EXTRA_WORDS appended (", weathered", ...): prompt i is grammar[i % 3200]
  (+ ", " + EXTRA_WORDS[i // 3200 - 1] from i = 3200 on); up to 3200 x 33."""
  from att3d_jax.shapes import scenes  # pylint: disable=g-import-not-at-top
  grammar = scenes.all_prompts()
  if count > len(grammar) * (1 + len(EXTRA_WORDS)):
    raise ValueError(f"--sizes: at most {len(grammar) * (1 + len(EXTRA_WORDS))} prompts")
  return [grammar[i % len(grammar)] + ("" if i < len(grammar) else
                                       ", " + EXTRA_WORDS[i // len(grammar) - 1])
          for i in range(count)]


def rss_bytes(pid: str = "self") -> int:
  with open(f"/proc/{pid}/status") as status:
    for line in status:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def time_launch(prompts_file: pathlib.Path, workdir: pathlib.Path, code_dir: pathlib.Path,
                timeout_s: float) -> dict:
  """Launch -> first metrics line of main.py, and its RSS then."""
  command = [sys.executable, "-m", "att3d_jax.main", "--config=configs/shapes.py",
             f"--workdir={workdir}", "--compilation_cache=",
             f"--config.prompts.file={prompts_file}", "--config.train.num_steps=2",
             "--config.train.log_every=1", "--config.train.progress_bar=False",
             "--config.eval.write_outputs=False", "--config.eval.max_train_prompts=8",
             "--config.eval.max_heldout_prompts=8"]
  env = dict(os.environ, PYTHONPATH=str(code_dir))
  metrics = workdir / "metrics.jsonl"
  start = time.time()
  child = subprocess.Popen(command, cwd=code_dir, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  try:
    while not (metrics.exists() and metrics.read_text().strip()):
      if child.poll() is not None:
        raise RuntimeError(f"main.py exited with {child.returncode}: {child.stderr.read()}")
      if time.time() - start > timeout_s:
        raise TimeoutError(f"no first step within {timeout_s} s")
      time.sleep(0.2)
    seconds = time.time() - start
    rss = rss_bytes(str(child.pid))
  finally:
    child.kill()
    child.wait()
  return {"launch_to_first_step_s": round(seconds, 1), "process_rss_mb": round(rss / 2**20)}


def text_memory(prompts: list[str], fill_steps: int) -> dict:
  """Bytes the lazy tables hold after the first step and after `fill_steps` more."""
  from att3d_jax import build  # pylint: disable=g-import-not-at-top
  from att3d_jax import prompt_data  # pylint: disable=g-import-not-at-top
  from configs import shapes  # pylint: disable=g-import-not-at-top
  config = shapes.get_config()
  guidance = build.load_guidance(config)
  prompt_data.encode_conditionings(guidance, ["warm up"])  # load MiniLM, compile its batches
  prompt_data.encode_embeddings(guidance, ["warm up"])
  before = rss_bytes()
  start = time.time()
  cache = prompt_data.text_cache(config)
  tables = prompt_data.lazy_prompt_tables(guidance, prompts, cache)
  tables.embedding[prompt_data.normalization_rows(len(prompts))]
  prompt_data.sample_batch(config, tables, 0)
  prompt_data.prefetch(tables, prompt_data.batch_index(config, len(prompts), 1)).result()
  first = {"tables_s": round(time.time() - start, 1), "cache_mb_first_step":
           round(cache.nbytes / 2**20, 1), "rss_delta_mb_first_step":
           round((rss_bytes() - before) / 2**20)}
  start = time.time()
  for step in range(1, 1 + fill_steps):
    prompt_data.sample_batch(config, tables, step)
  row = tables.conditioning[0].nbytes + tables.embedding[0].nbytes
  return {**first, "fill_steps": fill_steps,
          "fill_s_per_step": round((time.time() - start) / max(fill_steps, 1), 3),
          "cache_mb_after_fill": round(cache.nbytes / 2**20, 1),
          "rss_delta_mb_after_fill": round((rss_bytes() - before) / 2**20),
          "cache_cap_mb": config.prompts.text_cache_mb,
          "eager_tables_mb": round(len(prompts) * row / 2**20),
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[3200, 100_000])
  parser.add_argument("--code_dir", default=str(REPO), help="checkout whose main.py is timed")
  parser.add_argument("--out", default="/tmp/startup", help="prompt files and workdirs")
  parser.add_argument("--fill_steps", type=int, default=50,
                      help="batches encoded after the first step (text memory)")
  parser.add_argument("--skip_launch", action="store_true", help="text memory only")
  parser.add_argument("--skip_text", action="store_true", help="launch timing only")
  parser.add_argument("--timeout_s", type=float, default=1800)
  args = parser.parse_args()
  sys.path.insert(0, str(REPO))
  os.chdir(REPO)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for size in args.sizes:
    prompts = synthetic_prompts(size)
    prompts_file = out / f"prompts_{size}.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    row = {"prompts": size, "code": args.code_dir}
    if not args.skip_launch:
      workdir = out / f"run_{size}_{int(time.time())}"
      row.update(time_launch(prompts_file, workdir, pathlib.Path(args.code_dir),
                             args.timeout_s))
    if not args.skip_text:
      row.update(text_memory(prompts, args.fill_steps))
    print(json.dumps(row), flush=True)
    rows.append(row)
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
