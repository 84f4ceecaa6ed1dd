"""Statistics tables: paper tables whose numbers need no training (``kind: statistics`` in
``data/paper_tables/``). Each has a function here that computes its rows with ``onestage.analysis`` and writes one
record per row in the layout the aggregator reads; ``reproduce`` calls it through :data:`STATISTICS`.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

from onestage.analysis.fcos_assignment import (PAPER_TABLE_ROWS, AnchorSetting, AssignmentSetting,
                                               annotation_file_for, assignment_statistics, iter_coco_boxes)
from onestage.experiments.records import record_path, write_json_atomic

__all__ = ["STATISTICS", "fcos_assignment_records"]


def fcos_assignment_records(table, data: str, out_dir, min_size: Optional[int] = 800, max_size: Optional[int] = 1333,
                    max_images: Optional[int] = None, progress: bool = True) -> list[Path]:
    """Compute FCOS Tables 1–2 on ``data`` and write one record per table row (``<row>__seed0.json`` in
    ``out_dir/<table id>/``, the layout the aggregator reads): metrics under ``"stats"`` (``BPR``, ``amb_ratio``,
    ``amb_ratio_diff`` in percent, NaN-free), plus how they were made (annotation file, resize, image count)."""
    ann = annotation_file_for(data)
    if not ann.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann}")
    wanted = {r.name: PAPER_TABLE_ROWS[r.name] for r in table.rows if r.name in PAPER_TABLE_ROWS}
    fcos = [s for s in wanted.values() if isinstance(s, AssignmentSetting)]
    anchors = [s for s in wanted.values() if isinstance(s, AnchorSetting)]
    rows = assignment_statistics(iter_coco_boxes(ann, min_size, max_size, max_images), fcos, anchors,
                                 progress=progress)
    by_setting = {r["setting"]: r for r in rows}
    try:  # a repository-relative path where possible, so committed records don't name one machine's folders
        ann_name = str(ann.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        ann_name = str(ann)
    written = []
    for name, setting in wanted.items():
        r = by_setting[setting.name]
        stats = {"BPR": r["BPR"], "amb_ratio": r["ambiguous"], "amb_ratio_diff": r["ambiguous_diff_class"],
                 "positives_per_box": r["positives_per_box"]}
        stats = {k: v for k, v in stats.items() if not (isinstance(v, float) and math.isnan(v))}
        record = {
            "status": "finished", "seed": 0, "row": name, "table": table.id,
            "config": {"setting": dataclasses.asdict(setting), "annotation_file": ann_name, "data": data,
                       "min_size": min_size, "max_size": max_size, "max_images": max_images},
            "images": r["images"], "boxes": r["boxes"], "metrics": {"stats": stats},
            "made_by": f"python -m onestage reproduce {table.id} --data {data}",
        }
        path = record_path(out_dir, table.id, name, 0)
        write_json_atomic(path, record)
        written.append(path)
    return written


#: table id → the function that computes and writes its records: ``f(table, data, out_dir, progress=...)`` → paths
STATISTICS = {"fcos_ambiguity_bpr": fcos_assignment_records}
