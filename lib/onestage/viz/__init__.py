"""Plotting: every function returns a matplotlib ``Figure`` (no pyplot state), so notebooks, tests and the CLI share it.

* :mod:`.draw` — predictions / targets over an image.
* :mod:`.assignment` — FCOS target assignment: locations per level, positives per object, Table 1/2 statistics, and
  an ipywidgets explorer (``ipywidgets`` is imported only when the explorer is built).
* :mod:`.centerness` — FCOS center-ness: the eq. 3 target, re-ranking of a trained model's candidates by
  ``sqrt(cls·ctr)``, detections after NMS with and without it, and an explorer.
"""
from onestage.viz.assignment import (
    assignment_explorer,
    box_assignment_summary,
    image_assignment,
    plot_assignment,
    plot_level_locations,
    plot_statistics,
    published_assignment_numbers,
    resize_for_detector,
)
from onestage.viz.centerness import (
    RerankTable,
    centerness_explorer,
    centerness_map,
    detect,
    match_detections,
    nms_effect,
    nms_effect_markdown,
    plot_centerness_heatmaps,
    plot_detections,
    plot_rerank,
    rerank_candidates,
    rerank_table,
    spearman,
)
from onestage.viz.draw import draw_predictions, save_figure

__all__ = [
    "draw_predictions",
    "save_figure",
    "plot_level_locations",
    "plot_assignment",
    "plot_statistics",
    "assignment_explorer",
    "image_assignment",
    "box_assignment_summary",
    "resize_for_detector",
    "published_assignment_numbers",
    "centerness_map",
    "plot_centerness_heatmaps",
    "RerankTable",
    "rerank_candidates",
    "rerank_table",
    "spearman",
    "plot_rerank",
    "match_detections",
    "detect",
    "nms_effect",
    "nms_effect_markdown",
    "plot_detections",
    "centerness_explorer",
]
