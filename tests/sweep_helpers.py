"""Small experiment tables and notebooks for the sweep tests (tests/test_experiments.py, tests/test_ray_executor.py):
they exercise the runner without training anything."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat


def minimal_table(**changes) -> dict:
    t = {"id": "t", "title": "T", "model": "fcos",
         "source": {"paper": "P", "table": "Table 1", "where": "here"},
         "metric": "bbox.AP", "baseline": {},
         "rows": [{"name": "a", "overrides": {}, "published": {"AP": 1.0}},
                  {"name": "b", "overrides": {"x": 1}, "published": None}],
         "expect": [{"claim": "a below b", "row_a": "a", "row_b": "b", "sign": "<"}]}
    t.update(changes)
    return t


DUMMY_PARAMS = """model = "m"
preset = "cpu"
data = "synthetic"
seed = 0
overrides = {}
train_overrides = {}
out_dir = "out"
record_path = ""
quick = False
weights_from = ''"""

DUMMY_BODY = """from onestage.experiments.records import write_json_atomic
if overrides.get("explode"):
    raise RuntimeError("boom: this row is meant to fail")
write_json_atomic(record_path, {"status": "finished", "seed": seed, "config": {"overrides": overrides},
                                "metrics": {"bbox": {"AP": 10.0 * overrides["x"] + seed}}})"""


def write_notebook(path: Path, params: str, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


SLOW_BODY = """import pathlib, time
from onestage.experiments.records import write_json_atomic
log = pathlib.Path(out_dir).parent / "executions.log"
with open(log, "a") as f:
    f.write(f"{overrides['x']}\\n")
if overrides["x"] == 2 and pathlib.Path(out_dir).parent.joinpath("SLOW").exists():
    time.sleep(120)  # the sweep is killed while this row runs
write_json_atomic(record_path, {"status": "finished", "seed": seed, "metrics": {"bbox": {"AP": float(overrides["x"])}}})"""


def slow_sweep(tmp_path: Path, table_id: str):
    """A two-row table ``table_id`` on the SLOW_BODY notebook (row "second" sleeps while ``<out>/<table>/SLOW``
    exists): ``(table path, notebook, results root)``, the table folder created."""
    table = minimal_table(id=table_id, rows=[{"name": "first", "overrides": {"x": 1}, "published": None},
                                              {"name": "second", "overrides": {"x": 2}, "published": None}],
                           expect=[])
    table_path = tmp_path / f"{table_id}.json"
    table_path.write_text(json.dumps(table))
    nb = write_notebook(tmp_path / "slow.ipynb", DUMMY_PARAMS, SLOW_BODY)
    out = tmp_path / "out"
    (out / table_id).mkdir(parents=True)
    return table_path, nb, out
