"""Plotting: every function returns a matplotlib ``Figure`` (no pyplot state), so notebooks, tests and the CLI share it."""
from onestage.viz.draw import draw_predictions, save_figure

__all__ = ["draw_predictions", "save_figure"]
