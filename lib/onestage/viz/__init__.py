"""Plotting: every function returns a matplotlib ``Figure`` (no pyplot state), so notebooks, tests and the CLI share it.

* :mod:`.draw` — predictions / targets over an image.
* :mod:`.assignment` — FCOS target assignment: locations per level, positives per object, Table 1/2 statistics, and
  an ipywidgets explorer (``ipywidgets`` is imported only when the explorer is built).
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
]
