"""Published ablation tables, kept as data (``data/paper_tables/*.json``), loaded and checked here.

Why a schema check: every reproduction run, every aggregated report and every "does our effect have the paper's
sign?" verdict is driven by these files, and they are hand-written. A typo in a row name used by a claim, a metric
path without a section, or a published number without a source would otherwise surface as a confusing KeyError deep
inside an aggregation, or, worse, as a silently wrong comparison. :func:`validate_table` collects *all* problems of a
file and raises one :class:`TableError` listing them with the file name.

File format (one table per file; see ``data/paper_tables/README.md`` for the override names)::

    {
      "id": "condinst_table1",                 # = file stem
      "title": "...",
      "kind": "training" | "statistics",       # statistics: target-assignment statistics, no training
      "model": "condinst",                     # onestage.build_model name
      "notebook": "notebooks/experiment.ipynb" # optional; null = no notebook computes this table yet
      "source": {"paper": ..., "table": ..., "where": ...},   # where every published number comes from
      "metric": "segm.AP",                     # primary metric: "<section>.<name>" in a record's "metrics"
                                               # (or "cost.<name>": inference_ms, params_M, head_output_mib)
      "metrics": ["segm.AP", "segm.AP50"],     # optional: more metrics to report
      "baseline": {...},                       # model-config overrides shared by every row
      "train_overrides": {...},                # optional TrainConfig overrides shared by every row
      "rows": [{"name", "overrides", "published": {"AP": 30.9, ...} | null,
                "optional"?: bool, "reproduce"?: bool, "source"?, "note"?, "train_overrides"?}],
      "expect": [{"claim", "row_a", "row_b", "sign": "<" | ">" | "=", "metric"?, "tolerance"?,
                  "published_delta"?, "source"?}]
    }

``published`` keys are metric names *within the section* of the table's metrics (``"AP"`` for ``"segm.AP"``), in
percent, as papers print them. ``sign`` reads "row_a <sign> row_b". ``optional`` rows run only when named with
``--rows``; ``reproduce: false`` rows are published references that onestage cannot run (e.g. RetinaNet).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "TableError",
    "PaperTable",
    "Row",
    "Claim",
    "default_tables_dir",
    "repo_root",
    "load_table",
    "list_tables",
    "validate_table",
]

KINDS = ("training", "statistics")
SIGNS = ("<", ">", "=")
DEFAULT_NOTEBOOK = "notebooks/experiment.ipynb"
#: Row names become file names (``<row>__seed<k>.json``), so they are restricted to characters safe in paths.
ROW_NAME = re.compile(r"^[A-Za-z0-9_.=+-]+$")
METRIC_PATH = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")


class TableError(ValueError):
    """A paper-table file does not follow the schema; the message lists every problem found."""


def repo_root() -> Path:
    """The repository root (``lib/onestage/experiments/tables.py`` → three levels up from ``lib``)."""
    return Path(__file__).resolve().parents[3]


def default_tables_dir() -> Path:
    return repo_root() / "data" / "paper_tables"


@dataclass(frozen=True)
class Row:
    name: str
    overrides: dict
    published: Optional[dict]
    train_overrides: dict = field(default_factory=dict)
    optional: bool = False
    reproduce: bool = True
    source: Optional[str] = None
    note: Optional[str] = None


@dataclass(frozen=True)
class Claim:
    claim: str
    row_a: str
    row_b: str
    sign: str
    metric: Optional[str] = None  # None: the table's primary metric
    tolerance: float = 0.5  # for sign "=": |mean_a - mean_b| <= tolerance (metric units, percent)
    published_delta: Optional[float] = None
    source: Optional[str] = None


@dataclass(frozen=True)
class PaperTable:
    id: str
    title: str
    kind: str
    model: str
    source: dict
    metric: str
    metrics: tuple
    baseline: dict
    rows: tuple
    expect: tuple
    notebook: Optional[str] = DEFAULT_NOTEBOOK
    train_overrides: dict = field(default_factory=dict)
    notes: Optional[str] = None
    path: Optional[Path] = None

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"table {self.id!r} has no row {name!r}; rows: {[r.name for r in self.rows]}")

    def row_names(self) -> list[str]:
        return [r.name for r in self.rows]

    def runnable_rows(self, names: Optional[list[str]] = None) -> list[Row]:
        """Rows a reproduction would run: all reproducible, non-optional rows, or exactly ``names`` when given.

        Naming a row that cannot be reproduced (a published reference such as RetinaNet) is an error, so that a
        typo or a wrong expectation is not silently skipped.
        """
        if names is None:
            return [r for r in self.rows if r.reproduce and not r.optional]
        rows = []
        for n in names:
            r = self.row(n)
            if not r.reproduce:
                raise TableError(f"row {n!r} of {self.id!r} is a published reference only (reproduce: false)")
            rows.append(r)
        return rows

    def model_overrides(self, row: Row) -> dict:
        """Baseline overrides with the row's overrides on top (the row wins)."""
        return {**self.baseline, **row.overrides}

    def train_overrides_for(self, row: Row) -> dict:
        return {**self.train_overrides, **row.train_overrides}


def _check_number_dict(d, where: str, problems: list[str]) -> None:
    if d is None:
        return
    if not isinstance(d, dict):
        problems.append(f"{where}: must be an object of numbers or null, got {type(d).__name__}")
        return
    for k, v in d.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            problems.append(f"{where}.{k}: must be a number or null, got {v!r}")


def validate_table(data: dict, name: str = "<table>") -> PaperTable:
    """Check ``data`` (a parsed table file) against the schema and build a :class:`PaperTable`.

    Raises :class:`TableError` listing every problem, so one edit can fix them all.
    """
    problems: list[str] = []
    if not isinstance(data, dict):
        raise TableError(f"{name}: a table file must hold a JSON object, got {type(data).__name__}")

    def req(key, typ):
        if key not in data:
            problems.append(f"missing required key {key!r}")
            return None
        if not isinstance(data[key], typ):
            problems.append(f"{key!r} must be {getattr(typ, '__name__', typ)}, got {type(data[key]).__name__}")
            return None
        return data[key]

    tid = req("id", str)
    title = req("title", str)
    model = req("model", str)
    source = req("source", dict)
    metric = req("metric", str)
    baseline = req("baseline", dict)
    rows_raw = req("rows", list)
    expect_raw = data.get("expect", [])
    kind = data.get("kind", "training")
    known = {"id", "title", "kind", "model", "notebook", "source", "metric", "metrics", "baseline",
             "train_overrides", "rows", "expect", "notes"}
    for k in sorted(set(data) - known):
        problems.append(f"unknown key {k!r} (known: {sorted(known)})")
    if kind not in KINDS:
        problems.append(f"'kind' must be one of {KINDS}, got {kind!r}")
    if source is not None:
        for k in ("paper", "table", "where"):
            if not isinstance(source.get(k), str) or not source.get(k):
                problems.append(f"source.{k} must be a non-empty string (every published number needs a source)")
    metrics = data.get("metrics", [metric] if metric else [])
    if not isinstance(metrics, list):
        problems.append("'metrics' must be a list of '<section>.<name>' strings")
        metrics = []
    if metric is not None and metric not in metrics:
        metrics = [metric] + list(metrics)
    for m in metrics:
        if not isinstance(m, str) or not METRIC_PATH.match(m):
            problems.append(f"metric {m!r} must look like '<section>.<name>', e.g. 'segm.AP'")
    notebook = data.get("notebook", DEFAULT_NOTEBOOK)
    if notebook is not None and not isinstance(notebook, str):
        problems.append("'notebook' must be a path string or null")
    if kind == "statistics" and "notebook" not in data:
        problems.append("statistics tables must name their 'notebook' (or null until one exists)")
    train_overrides = data.get("train_overrides", {})
    if not isinstance(train_overrides, dict):
        problems.append("'train_overrides' must be an object")
        train_overrides = {}

    rows: list[Row] = []
    seen: set[str] = set()
    for i, r in enumerate(rows_raw or []):
        where = f"rows[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{where}: must be an object")
            continue
        rname = r.get("name")
        if not isinstance(rname, str) or not ROW_NAME.match(rname):
            problems.append(f"{where}.name {rname!r} must be a non-empty string of [A-Za-z0-9_.=+-] (used in file names)")
            continue
        where = f"row {rname!r}"
        if rname in seen:
            problems.append(f"{where}: duplicate row name")
        seen.add(rname)
        unknown = sorted(set(r) - {"name", "overrides", "published", "train_overrides", "optional", "reproduce",
                                   "source", "note"})
        if unknown:
            problems.append(f"{where}: unknown key(s) {unknown}")
        if not isinstance(r.get("overrides", None), dict):
            problems.append(f"{where}: 'overrides' must be an object (use {{}} for none)")
        if "published" not in r:
            problems.append(f"{where}: 'published' is required (null when no sourced number exists)")
        _check_number_dict(r.get("published"), f"{where}.published", problems)
        rows.append(Row(
            name=rname,
            overrides=dict(r.get("overrides") or {}),
            published=dict(r["published"]) if isinstance(r.get("published"), dict) else None,
            train_overrides=dict(r.get("train_overrides") or {}),
            optional=bool(r.get("optional", False)),
            reproduce=bool(r.get("reproduce", True)),
            source=r.get("source"),
            note=r.get("note"),
        ))
    if rows_raw is not None and not rows_raw:
        problems.append("'rows' is empty")

    claims: list[Claim] = []
    if not isinstance(expect_raw, list):
        problems.append("'expect' must be a list")
        expect_raw = []
    for i, c in enumerate(expect_raw):
        where = f"expect[{i}]"
        if not isinstance(c, dict):
            problems.append(f"{where}: must be an object")
            continue
        for k in ("claim", "row_a", "row_b", "sign"):
            if not isinstance(c.get(k), str):
                problems.append(f"{where}.{k} must be a string")
        if c.get("sign") not in SIGNS:
            problems.append(f"{where}.sign must be one of {SIGNS}, got {c.get('sign')!r}")
        for k in ("row_a", "row_b"):
            if isinstance(c.get(k), str) and c[k] not in seen:
                problems.append(f"{where}.{k} names unknown row {c[k]!r}")
        cm = c.get("metric")
        if cm is not None and (not isinstance(cm, str) or not METRIC_PATH.match(cm)):
            problems.append(f"{where}.metric {cm!r} must look like '<section>.<name>'")
        elif cm is not None and cm not in metrics:
            problems.append(f"{where}.metric {cm!r} is not among the table's metrics {metrics}")
        for k in ("tolerance", "published_delta"):
            v = c.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                problems.append(f"{where}.{k} must be a number")
        if problems:
            continue
        claims.append(Claim(claim=c["claim"], row_a=c["row_a"], row_b=c["row_b"], sign=c["sign"],
                            metric=cm, tolerance=float(c.get("tolerance", 0.5)),
                            published_delta=c.get("published_delta"), source=c.get("source")))

    if problems:
        raise TableError(f"{name}: invalid paper table:\n  - " + "\n  - ".join(problems))
    return PaperTable(id=tid, title=title, kind=kind, model=model, source=dict(source), metric=metric,
                      metrics=tuple(metrics), baseline=dict(baseline), rows=tuple(rows), expect=tuple(claims),
                      notebook=notebook, train_overrides=dict(train_overrides), notes=data.get("notes"))


def load_table(table: Union[str, Path], directory: Optional[Path] = None) -> PaperTable:
    """Load a table by id (``"condinst_table1"``, looked up in ``directory``) or by path to its JSON file."""
    p = Path(table)
    if p.suffix != ".json":
        directory = Path(directory) if directory is not None else default_tables_dir()
        p = directory / f"{table}.json"
        if not p.exists():
            known = ", ".join(list_tables(directory)) or "none"
            raise TableError(f"no paper table {str(table)!r} in {directory} (known: {known})")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TableError(f"{p}: not valid JSON: {e}") from e
    t = validate_table(data, name=str(p))
    if t.id != p.stem:
        raise TableError(f"{p}: 'id' is {t.id!r} but the file is named {p.stem!r}; they must agree")
    return dataclasses.replace(t, path=p)


def list_tables(directory: Optional[Path] = None) -> list[str]:
    """Ids of the table files in ``directory`` (default ``data/paper_tables``), sorted."""
    directory = Path(directory) if directory is not None else default_tables_dir()
    return sorted(p.stem for p in directory.glob("*.json"))
