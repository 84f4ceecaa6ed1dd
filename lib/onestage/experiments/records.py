"""Result records of reproduction runs: where they live, how they are written, how they are read back.

One run (a table row at one seed) leaves one JSON record ``<out>/<table>/<row>__seed<k>.json``. Records are written
atomically (a temporary file in the same folder, then ``os.replace``) because runs are interrupted (Ctrl-C, timeouts,
killed workers) and a half-written record must never be mistaken for a result: a reader sees either the old file or
the complete new one. ``status`` is ``"finished"`` for a run that produced metrics and ``"failed"`` otherwise; only
finished records are skipped by a resumed sweep, so failures are retried.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Optional

RECORD_FORMAT = "onestage-experiment-record-v1"
_UMASK = os.umask(0)  # read once (os.umask can only be read by setting it), restored at once
os.umask(_UMASK)
_RECORD_NAME = re.compile(r"^(?P<row>.+)__seed(?P<seed>\d+)\.json$")


def write_text_atomic(path: os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder, flushed to disk, and ``os.replace``.
    The file gets the mode a plain ``open`` would give it (0666 less the umask), not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: os.PathLike, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def repo_relative(obj, root: os.PathLike):
    """``obj`` (JSON-like) with every string that is a path under ``root`` rewritten relative to it, so a committed
    record names ``runs/reproduce/...`` rather than the folder of the machine it ran on. Other values are kept."""
    prefix = str(Path(root).resolve()).rstrip(os.sep) + os.sep
    if isinstance(obj, str):
        return obj[len(prefix):] if obj.startswith(prefix) else obj
    if isinstance(obj, dict):
        return {k: repo_relative(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [repo_relative(v, root) for v in obj]
    return obj


def run_stem(row: str, seed: int) -> str:
    return f"{row}__seed{seed}"


def record_path(out_dir: os.PathLike, table_id: str, row: str, seed: int) -> Path:
    return Path(out_dir) / table_id / f"{run_stem(row, seed)}.json"


def read_record(path: os.PathLike) -> Optional[dict]:
    """The record at ``path``, or ``None`` when it is missing or unreadable (treated as 'not run yet')."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def is_finished(path: os.PathLike) -> bool:
    rec = read_record(path)
    return rec is not None and rec.get("status") == "finished"


def iter_records(table_dir: os.PathLike) -> Iterator[tuple[str, int, dict]]:
    """``(row, seed, record)`` for every readable ``<row>__seed<k>.json`` in ``table_dir`` (sorted by name)."""
    table_dir = Path(table_dir)
    if not table_dir.is_dir():
        return
    for p in sorted(table_dir.glob("*__seed*.json")):
        m = _RECORD_NAME.match(p.name)
        rec = read_record(p) if m else None
        if rec is not None:
            yield m.group("row"), int(m.group("seed")), rec
