"""What the ATT3D experiments share: config variants, eval curves, CSV, plots.

Every experiment trains one or more models with `train.train_and_evaluate`,
reads their ground-truth metrics back, and writes <workdir>/<name>.csv, a
PNG plot and config.json (the config it used) next to one training workdir
per model.
"""

import csv
import json
import pathlib
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from att3d_jax import train
from att3d_jax.eval import shapes_eval
from configs import shapes

# Ground-truth metrics as CSV columns (att3d_jax/eval/shapes_eval.py).
METRICS = ("iou", "psnr", "color_acc", "r_precision") + shapes_eval.FACTOR_METRICS
METRIC_TITLES = {"iou": "silhouette IoU (GT)", "psnr": "PSNR vs GT (dB)",
                 "color_acc": "color accuracy (GT)", "r_precision": "GT R-precision",
                 **{name: f"{name[len('factor_'):]} right (nearest GT scene)"
                    for name in shapes_eval.FACTOR_METRICS}}
# --quick (test size) of generalization, interpolation and guidance_weight: a few
# steps and two evaluation views on top of configs/shapes.py:quick.
TINY = {"train.num_steps": 4, "eval.elevations_deg": (20.0,), "eval.views_per_elevation": 2}


def variant(config: ml_collections.ConfigDict,
            overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """An unlocked copy of config with dotted fields set, e.g. {"mapping.kind": "concat"}.

  Raises:
    ValueError: an override names a field the config does not have (a typo
      would otherwise add a field nothing reads).
  """
  copy = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    *sections, name = dotted.split(".")
    section = copy
    for part in sections + [name]:
      if not isinstance(section, ml_collections.ConfigDict) or part not in section:
        raise ValueError(f"config has no field {dotted!r}; configs/shapes.py lists the fields")
      parent, section = section, section[part]
    parent[name] = value
  return copy


def quick_config(guidance_path: str,
                 overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """configs/shapes.py:quick (test size) with the guidance model at guidance_path,
  no progress bar, plus dotted overrides."""
  return variant(shapes.get_config("quick"), {"guidance.path": guidance_path,
                                              "train.progress_bar": False,
                                              **(overrides or {})})


def train_model(config: ml_collections.ConfigDict, run_dir: pathlib.Path) -> dict:
  """`train.train_and_evaluate` into run_dir (resuming there); its eval results.

  Raises:
    RuntimeError: training was preempted (SIGTERM); the checkpoint is saved.
  """
  results = train.train_and_evaluate(config, str(run_dir))
  if results.get("preempted"):
    raise RuntimeError(f"training in {run_dir} was preempted at step {results['step']} "
                       "after saving a checkpoint; rerun the same command to resume")
  return results


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def evaluation_rows(step: int, results: Mapping[str, Any],
                    labels: Mapping[str, Any]) -> list[dict]:
  """{**labels, split, step, frames_per_prompt, *METRICS} for each split (train,
  heldout) that one evaluation (an eval_curve.jsonl line, eval.json) scored."""
  return [{**labels, "split": split, "step": step,
           "frames_per_prompt": results["frames_per_prompt"],
           **{name: results[split][name] for name in METRICS}}
          for split in ("train", "heldout") if results.get(split)]


def curve_rows(run_dir: pathlib.Path, labels: Mapping[str, Any]) -> list[dict]:
  """`evaluation_rows` of every evaluation in run_dir/eval_curve.jsonl."""
  path = run_dir / "eval_curve.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: train with config.eval.curve_every > 0")
  rows = []
  for line in path.read_text().splitlines():
    point = json.loads(line)
    rows += evaluation_rows(point["step"], point, labels)
  return rows


def frames_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
  """Frames per prompt where a (frames, iou) curve, sorted by frames, first reaches
  `target`, linearly interpolated between evaluations; None if it never does."""
  previous = None
  for frames, iou in points:
    if iou >= target:
      if previous is None:
        return frames
      frames0, iou0 = previous
      return frames0 + (frames - frames0) * (target - iou0) / (iou - iou0)
    previous = (frames, iou)
  return None


def write_csv(rows: Sequence[dict], path: pathlib.Path) -> None:
  if not rows:
    raise ValueError(f"no rows to write to {path}")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(figure, path: pathlib.Path) -> None:
  """tight_layout, write a 120-dpi PNG, close."""
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot().close(figure)


def save_image_rows(rows: Sequence[tuple[str, np.ndarray]], column_labels: Sequence[str],
                    path: pathlib.Path, title: str = "") -> None:
  """A labeled grid of renders: one row per (label, frames [C, H, W, 3] in [0, 1]),
  C = len(column_labels) columns."""
  plt = pyplot()
  height, width = rows[0][1].shape[1:3]
  columns = len(column_labels)
  figure, axes = plt.subplots(len(rows), 1, squeeze=False,
                              figsize=(2.0 + 0.7 * columns, 0.5 + 0.7 * len(rows)))
  for row, (axis, (label, frames)) in enumerate(zip(axes[:, 0], rows)):
    if frames.shape != (columns, height, width, 3):
      raise ValueError(f"row {label!r} has frames {frames.shape}; expected "
                       f"{(columns, height, width, 3)}")
    axis.imshow(np.clip(np.concatenate(list(frames), axis=1), 0.0, 1.0))
    # Column labels once, above the first row.
    axis.set_xticks([(i + 0.5) * width for i in range(columns)] if row == 0 else [],
                    list(column_labels) if row == 0 else [], fontsize=7)
    axis.xaxis.tick_top()
    axis.set_yticks([])
    axis.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
  if title:
    axes[0, 0].set_title(title, fontsize=9)
  save_figure(figure, path)
