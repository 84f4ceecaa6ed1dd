"""`make demo`: ``python -m onestage quickstart`` executes notebooks/00_quickstart.ipynb and leaves the executed
notebook, its HTML export and the COCO table in the run folder (quick mode here: smoke preset, a few iterations)."""
from __future__ import annotations

import json

import nbformat

from onestage.cli import main


def test_quickstart_writes_notebook_html_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["quickstart", "--quick", "--out", str(out), "--no-progress", "-p", "eval_images", "3"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "metrics.json").read_text())
    table = (out / "coco_table.txt").read_text().strip()
    assert record["model"] == "fcos" and record["use_checkpoint"] is False and record["preset"] == "smoke"
    assert set(record["metrics"]["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert table.splitlines()[1].split() == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert table in printed and str(out / "00_quickstart.html") in printed
    nb = nbformat.read(out / "00_quickstart.ipynb", as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "out_dir" in injected[0].source
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    html = (out / "00_quickstart.html").read_text()
    assert "COCO AP on 3 synthetic val images" in html and "data:image/png;base64" in html
    assert (out / "predictions.png").stat().st_size > 0 and (out / "train" / "final.pt").is_file()


def test_quickstart_rejects_an_unknown_model(tmp_path, capsys):
    assert main(["quickstart", "--model", "yolo", "--out", str(tmp_path / "d")]) == 2
    assert "unknown model 'yolo'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
