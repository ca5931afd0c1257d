"""File names made from prompts: the one place outputs get their names.

A prompt is user text: it may hold "/" or "..", control characters, thousands
of characters or non-ASCII text. `for_prompt` turns it into a portable file
stem: ASCII letters, digits, "_" and "-" only (spaces become "_"; accented
letters lose their accents, e.g. "é" -> "e"; everything else is dropped), so no
path separator, no "." at all (hence no ".."), no control character; at most
`max_length` characters. Whenever the text had to be changed beyond spaces ->
"_" (characters dropped, accents stripped, length cut), a short hash of the
full prompt is appended, so two different prompts that map to the same
readable part still get different names; a prompt with nothing readable left
(e.g. all CJK, or only punctuation) becomes "prompt-<hash>". Names that Windows
reserves (con, nul, com1...) get a "_" appended.

`Namer` adds collision suffixes ("-2", "-3", ...) among names handed out to one
output folder, compared case-insensitively (macOS and Windows file systems).
"""

import hashlib
import re
import unicodedata

MAX_LENGTH = 80  # characters of a stem, hash suffix included
FALLBACK = "prompt"  # the stem of a prompt with nothing readable in it
HASH_LENGTH = 8  # hex digits of sha1(prompt) appended to changed names
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                     *(f"lpt{i}" for i in range(1, 10))}


def _prompt_hash(prompt: str) -> str:
  return hashlib.sha1(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_LENGTH]


def for_prompt(prompt: str, max_length: int = MAX_LENGTH) -> str:
  """A safe file stem (no extension) for `prompt`; deterministic."""
  if max_length < HASH_LENGTH + len(FALLBACK) + 1:
    raise ValueError(f"max_length={max_length} leaves no room for a readable name; "
                     f"use at least {HASH_LENGTH + len(FALLBACK) + 1}")
  words = "_".join(prompt.split())  # any whitespace run (tabs, newlines too) -> "_"
  ascii_text = unicodedata.normalize("NFKD", words).encode("ascii", "ignore").decode("ascii")
  readable = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_-]", "", ascii_text)).strip("_-")
  if not readable:
    return f"{FALLBACK}-{_prompt_hash(prompt)}"
  keep = max_length - HASH_LENGTH - 1
  if readable != words or len(readable) > max_length:
    readable = f"{readable[:keep].rstrip('_-')}-{_prompt_hash(prompt)}"
  if readable.lower() in _WINDOWS_RESERVED:
    readable += "_"
  return readable


class Namer:
  """Hands out distinct stems within one output folder (collisions get -2, -3...)."""

  def __init__(self, max_length: int = MAX_LENGTH):
    self.max_length = max_length
    self._taken: set[str] = set()

  def __call__(self, prompt: str) -> str:
    stem = for_prompt(prompt, self.max_length)
    candidate, count = stem, 1
    while candidate.casefold() in self._taken:
      count += 1
      suffix = f"-{count}"
      candidate = stem[:self.max_length - len(suffix)] + suffix
    self._taken.add(candidate.casefold())
    return candidate
