"""The shipped models are package data, found from any working directory."""

import os
import pathlib

import pytest

import att3d_jax
from att3d_jax import assets


def test_shipped_models_are_inside_the_package():
  for name in ("shapes", "att3d_shapes", "att3d_shapes_2400"):
    path = assets.shipped(name)
    package_dir = pathlib.Path(att3d_jax.__file__).resolve().parent
    assert path.is_dir() and path.parent.parent == package_dir


def test_config_names_resolve_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert assets.resolve("weights/shapes") == str(assets.shipped("shapes"))
  assert assets.resolve("weights/att3d_shapes") == str(assets.shipped("att3d_shapes"))


def test_an_existing_folder_wins_over_the_shipped_one(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("weights/shapes")
  assert assets.resolve("weights/shapes") == "weights/shapes"


def test_unknown_names_pass_through_and_shipped_names_are_checked(tmp_path):
  assert assets.resolve(str(tmp_path / "nothing")) == str(tmp_path / "nothing")
  assert assets.resolve("weights/no_such_model") == "weights/no_such_model"
  with pytest.raises(FileNotFoundError, match="no_such_model"):
    assets.shipped("no_such_model")
