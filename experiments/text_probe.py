r"""Can the mapping network's text input tell the factors of unseen prompts apart?

A linear probe on shapes_2400: ridge regression from the 2000 training
prompts' text embeddings to one-hot factor values (color, shape, size, hat,
hat color), scored on the 400 held-out prompts. Accuracy near 1 means the
text input is not what limits compositional generalization; the generator
and its training are.

  python -m experiments.text_probe

Inputs probed: the pooled MiniLM sentence embedding (what the mapping network
reads), the flattened token embeddings, and the mean token embedding.
"""

import numpy as np

from att3d_jax.shapes import diffusion
from att3d_jax.shapes import prompt_sets
from att3d_jax.shapes import scenes

FACTORS = ("color", "shape", "size", "hat", "hat_color")


def probe_accuracy(features: np.ndarray, labels: np.ndarray, num_train: int,
                   ridge: float = 0.1) -> float:
  """Held-out accuracy of a ridge one-vs-rest probe.

  Args:
    features: [P, D] float, the first num_train rows train the probe.
    labels: [P] int class of each row.
    num_train: rows used for fitting; the rest are scored.
    ridge: L2 weight of the least-squares fit.
  """
  features = features - features[:num_train].mean(0)
  features = features / (features[:num_train].std() + 1e-6)
  features = np.concatenate([features, np.ones((len(features), 1))], axis=1)
  targets = np.eye(labels.max() + 1)[labels[:num_train]]
  train = features[:num_train]
  if train.shape[1] > num_train:  # the dual form: a num_train x num_train solve
    weights = train.T @ np.linalg.solve(train @ train.T + ridge * np.eye(num_train), targets)
  else:
    weights = np.linalg.solve(train.T @ train + ridge * np.eye(train.shape[1]),
                              train.T @ targets)
  predicted = (features[num_train:] @ weights).argmax(1)
  return float(np.mean(predicted == labels[num_train:]))


def main() -> None:
  prompt_set = prompt_sets.load_prompt_set("shapes_2400", "100%")
  prompts = prompt_set.train + prompt_set.heldout
  model = diffusion.ShapesDiffusionModel()
  conditioning = diffusion.encode_captions(model.encoder, prompts)  # [P, 1 + L, D]
  inputs = {"pooled (the mapping input)": conditioning[:, 0],
            "tokens, flattened": conditioning[:, 1:].reshape(len(prompts), -1),
            "tokens, mean": conditioning[:, 1:].mean(1)}
  parsed = [scenes.parse_prompt(p) for p in prompts]
  for name, features in inputs.items():
    scores = {}
    for factor in FACTORS:
      values = [str(getattr(scene, factor)) for scene in parsed]
      vocabulary = sorted(set(values))
      labels = np.array([vocabulary.index(v) for v in values])
      scores[factor] = probe_accuracy(features, labels, len(prompt_set.train))
    print(f"{name:28s} " + " ".join(f"{f} {a:.3f}" for f, a in scores.items()))


if __name__ == "__main__":
  main()
