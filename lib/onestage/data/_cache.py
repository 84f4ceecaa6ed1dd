"""Build-once folders: generated datasets are written atomically and reused while their parameters match."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def split_paths(folder) -> dict:
    """The paths every generated dataset shares (the layout :func:`onestage.data.synthetic.generate` writes)."""
    folder = Path(folder)
    return {
        "root": str(folder),
        "train_ann": str(folder / "annotations" / "train.json"),
        "val_ann": str(folder / "annotations" / "val.json"),
        "train_images": str(folder / "train"),
        "val_images": str(folder / "val"),
    }


def is_current(folder, params: dict) -> bool:
    """True when ``folder`` holds a complete build made with exactly ``params``."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text()).get("params") == params
    except (OSError, ValueError):
        return False


def is_complete(folder) -> bool:
    """True when ``folder`` holds a finished build (its manifest is written last), whatever its parameters."""
    try:
        return "params" in json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False


def ensure_built(root, params: dict, build: Callable[[Path], None]) -> dict:
    """Run ``build(tmp_dir)`` unless ``root`` already holds a build with ``params``; returns :func:`split_paths`.

    The build goes to a temporary sibling folder, gets its manifest (written last), and is renamed into place, so
    an interrupted build never leaves a folder that looks complete. A stale ``root`` (other parameters) is
    replaced. If another process renames an identical build into place first, ours is discarded.
    """
    root = Path(root)
    if is_current(root, params):
        return split_paths(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        build(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"params": params}, sort_keys=True, indent=1) + "\n")
        if root.exists():
            logger.info("%s was built with other parameters; rebuilding", root)
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:
            if not is_current(root, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return split_paths(root)
