"""``make demo``: run ``notebooks/00_quickstart.ipynb`` headlessly and keep what it made.

:func:`run_quickstart` executes the notebook with papermill (parameters injected after its ``parameters`` cell),
writes the executed notebook and an HTML export (nbconvert) into ``runs/demo-<time>/`` together with what the notebook
itself writes there (``metrics.json``, ``coco_table.txt``, ``predictions.png``, the training run in ``train/``), and
returns the paths and the COCO table. ``python -m onestage quickstart`` is the command-line face of it.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

__all__ = ["QUICKSTART_NOTEBOOK", "run_quickstart", "export_html", "notebook_html"]

#: The notebook ``make demo`` runs.
QUICKSTART_NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "00_quickstart.ipynb"


def notebook_html(nb) -> str:
    """An (executed) notebook node as one HTML page: nbconvert's lab template, images embedded."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter()
    level = exporter.log.level
    exporter.log.setLevel(logging.ERROR)  # not "alternative text is missing" for every figure
    try:
        body, _ = exporter.from_notebook_node(nb)
    finally:
        exporter.log.setLevel(level)
    return body


def export_html(notebook: Path, html: Optional[Path] = None) -> Path:
    """An HTML copy of an executed notebook (:func:`notebook_html`), written atomically."""
    import nbformat

    notebook = Path(notebook)
    html = Path(html) if html is not None else notebook.with_suffix(".html")
    body = notebook_html(nbformat.read(notebook, as_version=4))
    tmp = html.with_name(html.name + ".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(html)
    return html


def run_quickstart(model: str = "fcos", out: Optional[Path] = None, use_checkpoint: bool = False,
                   quick: bool = False, parameters: Optional[dict] = None, notebook: Path = QUICKSTART_NOTEBOOK,
                   kernel_name: str = "python3", log_output: bool = True, execution_timeout: Optional[int] = None,
                   html: bool = True) -> dict:
    """Execute the quickstart notebook for ``model`` into ``out`` (default ``runs/demo-<time>``).

    ``parameters`` override the notebook's other parameters (``train_iters``, ``eval_images``).
    ``log_output`` streams the cells' output to the log as they run. Returns ``out_dir``, ``notebook`` and ``html``
    (paths), ``metrics`` (``{"bbox": {...}, "segm": {...}}``) and ``table`` (the COCO table the notebook printed).
    When a cell fails, the partly executed notebook and its HTML are still written, then the error is raised."""
    import papermill

    out = Path(out) if out is not None else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    params = {"model_name": model, "use_checkpoint": bool(use_checkpoint), "quick": bool(quick),
              "out_dir": str(out), **(parameters or {})}
    executed = out / Path(notebook).name
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters=params, kernel_name=kernel_name,
                                   cwd=str(Path(notebook).parent), progress_bar=False, log_output=log_output,
                                   execution_timeout=execution_timeout)
    finally:
        html_path = export_html(executed) if html and executed.is_file() else None
    record = json.loads((out / "metrics.json").read_text())
    table = (out / "coco_table.txt").read_text().rstrip("\n")
    return {"out_dir": out, "notebook": executed, "html": html_path, "metrics": record["metrics"], "table": table}
