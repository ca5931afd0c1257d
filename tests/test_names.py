"""Output names made from prompts: safe, bounded, distinct."""

import pytest

from att3d_jax import names

UNSAFE = ["../../x", "..", "a/b\\c", "a\x00b\x1bc\x7f", "~/.ssh/id_rsa", "C:\\Windows"]


@pytest.mark.parametrize("prompt", UNSAFE + ["x" * 300, "红色立方体", "un cube rouge foncé",
                                             " \t\n ", "!!!", "con", "a red cube"])
def test_names_are_portable_stems(prompt):
  name = names.for_prompt(prompt)
  assert 0 < len(name) <= names.MAX_LENGTH
  assert all(c.isascii() and (c.isalnum() or c in "_-") for c in name), name
  assert ".." not in name and "/" not in name and "\\" not in name
  assert name.lower() not in ("con", "nul", "prn", "aux")


def test_names_as_the_report_shows_them():
  assert names.for_prompt("a red cube") == "a_red_cube"
  assert names.for_prompt("../../x") == "x-9bdbf20b"
  assert names.for_prompt(" \t\n ") == "prompt-06b18e5c"  # empty after stripping
  assert names.for_prompt("un cube rouge foncé") == "un_cube_rouge_fonce-367b72e0"
  assert names.for_prompt("红色立方体") == "prompt-dc3e7e23"
  long_name = names.for_prompt("x" * 300)
  assert long_name == "x" * 71 + "-02fd6825" and len(long_name) == names.MAX_LENGTH


def test_changed_prompts_keep_distinct_names():
  """Prompts that differ only in dropped characters or past the cut differ by hash."""
  variants = ["a red cube", "a red cube!", "a red cube?", "a/red cube", "红", "绿",
              "y" * 200 + "a", "y" * 200 + "b"]
  assert len({names.for_prompt(p) for p in variants}) == len(variants)


def test_namer_suffixes_collisions_case_insensitively():
  namer = names.Namer()
  assert [namer("a red cube"), namer("a red cube"), namer("A red cube")] == [
      "a_red_cube", "a_red_cube-2", "A_red_cube-3"]
  long_namer = names.Namer()
  first, second = long_namer("z" * 300), long_namer("z" * 300)
  assert first != second and len(second) <= names.MAX_LENGTH and second.endswith("-2")


def test_too_small_max_length_is_refused():
  with pytest.raises(ValueError, match="max_length"):
    names.for_prompt("a red cube", max_length=5)
