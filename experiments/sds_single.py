r"""Per-prompt SDS with the shapes diffusion model: the per-prompt baseline
(`mapping.kind = "per_prompt"`, one free hash grid per prompt) of the main
trainer, on configs/sds_single.py's 8 prompts, all of them in every step.

Quality is measured against ground truth by the trainer's evaluation
(silhouette IoU over 16 views, color by `shapes_eval.color_of`), and the
density-bias blob alone (step 0 of the IoU curve) is reported as the floor.

  python -m experiments.sds_single --config=configs/sds_single.py --workdir=runs/sds_single

Writes workdir/results.json (median and minimum IoU, colors right, the IoU
curve) next to the trainer's eval.json, turntables and meshes (outputs/train/).
"""

import json
import pathlib

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from att3d_jax import train
from att3d_jax import xla_cpu


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates `config` in `workdir`; returns (and writes) results.json."""
  workdir = pathlib.Path(workdir)
  evaluation = train.train_and_evaluate(config, str(workdir))
  rows = [{key: row[key] for key in ("prompt", "iou", "color", "color_ok")}
          for row in evaluation["per_prompt"]]
  curve = []
  if (workdir / "eval_curve.jsonl").exists():
    curve = [{"step": point["step"], "mean_iou": point["train"]["iou"]}
             for point in map(json.loads,
                              (workdir / "eval_curve.jsonl").read_text().splitlines())]
  ious = [row["iou"] for row in rows]
  results = {
      "steps": evaluation["steps"],
      "seconds": evaluation["train_seconds"],
      "seconds_per_prompt": evaluation["train_seconds"] / len(rows),
      "frames_per_prompt": evaluation["frames_per_prompt"],
      "median_iou": float(np.median(ious)),
      "min_iou": float(np.min(ious)),
      "colors_right": int(sum(row["color_ok"] for row in rows)),
      "per_prompt": rows,
      "curve": curve,
  }
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  xla_cpu.split_host(_CONFIG.value.train.cpu_devices)  # before the first computation
  results = run(_CONFIG.value, _WORKDIR.value)
  print(f"{'prompt':24s} {'IoU':>6s} color")
  for row in results["per_prompt"]:
    print(f"{row['prompt']:24s} {row['iou']:6.3f} {row['color']}"
          f"{'' if row['color_ok'] else '  (wrong)'}")
  print(f"median IoU {results['median_iou']:.3f}, min {results['min_iou']:.3f}, colors "
        f"{results['colors_right']}/{len(results['per_prompt'])}, "
        f"{results['seconds_per_prompt']:.0f} s per prompt")


if __name__ == "__main__":
  # Flags are defined here, not at import, so tests can import several
  # experiment modules into one process without absl flag clashes.
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/sds_single.py",
                                            "experiment config", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", "runs/sds_single", "where outputs are written")
  app.run(main)
