r"""ATT3D's real prompt sets, their committed files, and loading.

Sets (files under att3d_jax/data/prompts/<name>/, one prompt per line, lines
starting with '#' are comments). Sources and what is confirmed about each list
are in the ATT3D notes' prompt-set file; the lists are copied here so that the
package never reads it at run time.

  df27: the 27 DreamFusion prompts of ATT3D's DF27 experiment, as the
    threestudio reimplementation (branch att3d-test, load/DF27.json) lists
    them; all train, none held out. (That this equals the paper's DF27 is
    unconfirmed.)
  pig64: "a pig {activity} {theme}" over 8 activities x 8 themes. The first 7
    of each are the reimplementation's lists; the paper's 8th activity and
    theme are not public, so we chose "riding a motorcycle" and "wearing a
    backpack", both from the ATT3D-derived animal set below. The diagonal
    (activity i with theme i) is held out, as on the ATT3D and AToM project
    pages: 56 train, 8 held out.
  animals: the compositional animal set. The paper's exact 2400-prompt
    factorization is not public; we use ScaleDreamer's "prompts from ATT3D
    experiments", "{animal} {activity} wearing {outfit} wearing {hat}" over
    10 x 7 x 6 x 6 = 2520 prompts (verbatim, including its "wearing a backpack
    wearing a backpack" combinations), and hold out 120 drawn with a fixed
    seed, which leaves exactly the paper's 2400 training prompts. The pool file
    is in random order and the train splits are its prefixes, so they are
    nested: "12.5%" = 300 (the paper's and AToM's count), "50%" = 1200,
    "100%" = 2400; the same 120 held-out prompts serve every split.

Regenerate the files after changing a list with `python -m att3d_jax.real_prompts`;
a test checks that the committed files are in sync.
"""

import itertools
import pathlib
from typing import Callable

import numpy as np

from att3d_jax.guidance import text
from att3d_jax.shapes import prompt_sets

PROMPTS_DIR = prompt_sets.PROMPTS_DIR
TRAIN_FILE, HELDOUT_FILE = prompt_sets.TRAIN_FILE, prompt_sets.HELDOUT_FILE
REGENERATE_COMMAND = "python -m att3d_jax.real_prompts"
PromptSet = prompt_sets.PromptSet

# Set name -> its train splits (fractions of train.txt, as prefixes).
PROMPT_SETS = {
    "df27": ("100%",),
    "pig64": ("100%",),
    "animals": ("12.5%", "50%", "100%"),
}

DF27 = (
    "a DSLR photo of an orangutan making a clay bowl on a throwing wheel",
    "a zoomed out DSLR photo of a raccoon astronaut holding his helmet",
    "a DSLR photo of a blue jay standing on a large basket of rainbow macarons",
    "a DSLR photo of a corgi taking a selfie",
    "a zoomed out DSLR photo of a table with dim sum on it",
    "a DSLR photo of a lion reading the newspaper",
    "Michelangelo style statue of dog reading news on a cellphone",
    "a DSLR photo of a tiger dressed as a doctor",
    "a DSLR photo of a steam engine train, high resolution",
    "a DSLR photo of a frog wearing a sweater",
    "a DSLR photo of a humanoid robot playing the cello",
    "a zoomed out DSLR photo of Sydney opera house, aerial view",
    "a zoomed out DSLR photo of an all-utility vehicle driving across a stream",
    "a DSLR photo of a chimpanzee dressed like Henry VIII king of England",
    "a zoomed out DSLR photo of a baby bunny sitting on top of a stack of pancakes",
    "a sliced loaf of fresh bread",
    "a DSLR photo of a bulldozer clearing away a pile of snow",
    "a DSLR photo of a classic Packard car",
    "a wide angle zoomed out DSLR photo of zoomed out view of Tower Bridge made out of "
    "gingerbread and candy",
    "a DSLR photo of a robot and dinosaur playing chess, high resolution",
    "a squirrel gesturing in front of an easel showing colorful pie charts",
    "a DSLR photo of a peacock on a surfboard",
    "a zoomed out DSLR photo of a robot couple fine dining",
    "a DSLR photo of a pirate collie dog, high resolution",
    "a delicious hamburger",
    "a bumblebee sitting on a pink flower",
    "an English castle, aerial view",
)

PIG_TEMPLATE = "a pig {activity} {theme}"
PIG_ACTIVITIES = ("riding a bicycle", "sitting on a chair", "playing the guitar",
                  "holding a shovel", "holding a blue balloon", "holding a book",
                  "wielding a katana",
                  "riding a motorcycle")  # our 8th (the paper's is unpublished)
PIG_THEMES = ("made out of gold", "carved out of wood", "wearing a leather jacket",
              "wearing a tophat", "wearing a party hat", "wearing a sombrero",
              "wearing medieval armor",
              "wearing a backpack")  # our 8th

ANIMAL_TEMPLATE = "{animal} {activity} wearing {outfit} wearing {hat}"
ANIMALS = ("a squirrel", "a raccoon", "a pig", "a monkey", "a robot", "a lion", "a rabbit",
           "a tiger", "an orangutan", "a bear")
ANIMAL_ACTIVITIES = ("riding a motorcycle", "sitting on a chair", "playing the guitar",
                     "holding a shovel", "holding a blue balloon", "holding a book",
                     "wielding a katana")
ANIMAL_OUTFITS = ("a leather jacket", "a sweater", "a cape", "a medieval armor", "a backpack",
                  "a suit")
ANIMAL_HATS = ("a party hat", "a sombrero", "a helmet", "a tophat", "a backpack",
               "a baseball cap")
ANIMALS_SEED = 2400
ANIMALS_HELDOUT_SIZE = 120  # 2520 - 120 = the paper's 2400 training prompts


def df27_prompts() -> tuple[list[str], list[str]]:
  """(train [27], heldout [0]) of df27."""
  return list(DF27), []


def pig64_prompts() -> tuple[list[str], list[str]]:
  """(train [56], heldout [8]) of pig64, activity-major order."""
  train, heldout = [], []
  for activity_index, activity in enumerate(PIG_ACTIVITIES):
    for theme_index, theme in enumerate(PIG_THEMES):
      prompt = PIG_TEMPLATE.format(activity=activity, theme=theme)
      (heldout if activity_index == theme_index else train).append(prompt)
  return train, heldout


def animal_prompts() -> list[str]:
  """All 2520 prompts, in the source's itertools.product order."""
  return [ANIMAL_TEMPLATE.format(animal=a, activity=b, outfit=c, hat=d)
          for a, b, c, d in itertools.product(ANIMALS, ANIMAL_ACTIVITIES, ANIMAL_OUTFITS,
                                              ANIMAL_HATS)]


def animals_prompts() -> tuple[list[str], list[str]]:
  """(train pool [2400] in nested-split order, heldout [120] sorted) of animals."""
  prompts = animal_prompts()
  order = np.random.default_rng(ANIMALS_SEED).permutation(len(prompts))
  heldout = sorted(prompts[i] for i in order[:ANIMALS_HELDOUT_SIZE])
  pool = [prompts[i] for i in order[ANIMALS_HELDOUT_SIZE:]]
  return pool, heldout


_GENERATORS: dict[str, Callable[[], tuple[list[str], list[str]]]] = {
    "df27": df27_prompts, "pig64": pig64_prompts, "animals": animals_prompts}
_DESCRIPTIONS = {
    "df27": "the 27 DreamFusion prompts of ATT3D's DF27 (threestudio att3d-test list)",
    "pig64": "'a pig {activity} {theme}', 8 x 8; the diagonal (activity i, theme i) is "
             "held out",
    "animals": (f"'{ANIMAL_TEMPLATE}', 10 x 7 x 6 x 6 = 2520; {ANIMALS_HELDOUT_SIZE} held "
                f"out with seed {ANIMALS_SEED}; train splits are prefixes of train.txt "
                "(12.5% / 50% / 100%)"),
}


def generate_prompt_files() -> dict[str, str]:
  """Contents of every real prompt file, keyed by path relative to PROMPTS_DIR."""
  return prompt_sets.prompt_file_contents(_GENERATORS, _DESCRIPTIONS, REGENERATE_COMMAND)


def write_prompt_files(directory: pathlib.Path = PROMPTS_DIR) -> None:
  prompt_sets.write_files(generate_prompt_files(), directory)


def read_prompt_file(path: pathlib.Path) -> list[str]:
  """Prompts of one file, in file order (any non-empty text; see
  `prompt_sets.read_prompt_file` for the errors)."""
  prompts = prompt_sets.read_prompt_file(path, check=None, regenerate=REGENERATE_COMMAND)
  text.validate_prompts(prompts)
  return prompts


def load_prompt_set(name: str, split: str = "100%",
                    directory: pathlib.Path = PROMPTS_DIR) -> PromptSet:
  """Loads a real prompt set from its committed files.

  Args:
    name: one of PROMPT_SETS.
    split: train split, one of PROMPT_SETS[name]: that fraction of train.txt,
      as a prefix. The held-out prompts are the same for every split.
    directory: where the sets live (the package's data by default).

  Raises:
    ValueError: unknown name or split (listing the available ones), or a
      malformed or empty training file (naming the file and line).
  """
  if name not in PROMPT_SETS:
    raise ValueError(f"unknown prompt set {name!r}; available: {list(PROMPT_SETS)}")
  if split not in PROMPT_SETS[name]:
    raise ValueError(f"unknown split {split!r} of prompt set {name!r}; available: "
                     f"{list(PROMPT_SETS[name])}")
  train_path = directory / name / TRAIN_FILE
  train = read_prompt_file(train_path)
  if not train:
    raise ValueError(f"{train_path} holds no prompts; regenerate the files with "
                     "`python -m att3d_jax.real_prompts`")
  heldout = read_prompt_file(directory / name / HELDOUT_FILE)
  num_train = round(prompt_sets.SPLIT_FRACTIONS[split] * len(train))
  return PromptSet(name=name, train=train[:num_train], heldout=heldout)


if __name__ == "__main__":
  write_prompt_files()
  print(f"wrote {len(generate_prompt_files())} prompt files under {PROMPTS_DIR}")
