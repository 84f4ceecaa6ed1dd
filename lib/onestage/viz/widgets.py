"""The wiring every explorer widget shares: controls → render a Figure → a PNG and an HTML caption.

A figure is shown as a PNG inside an ``ipywidgets.Image`` so it renders in any front end (and in a static notebook
export) without a matplotlib widget backend. An exception while rendering is shown in the caption and kept in
``state.error`` instead of vanishing into the widget state, where papermill and nbval would never see it.
"""
from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Callable, Sequence

from matplotlib.figure import Figure


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_explorer(controls: dict, rows: Sequence[Sequence[str]], render: Callable[[], tuple],
                    state: SimpleNamespace, dpi: int = 80):
    """A ``VBox`` of the ``controls`` (laid out by name in ``rows``), a caption and the picture.

    ``render()`` reads the controls, fills in whatever it wants to expose on ``state`` and returns
    ``(figure, caption_html)``; it runs once now and again on every change of a control's value. The widget carries
    ``controls``, ``state`` (plus ``redraws``, ``figure``, ``error``) and ``update`` so tests can set ``.value`` and
    check the effect.
    """
    import ipywidgets as widgets

    picture = widgets.Image(format="png")
    picture.layout.align_self = "flex-start"  # a VBox would stretch (and blur) the picture to full width
    caption = widgets.HTML()
    state.redraws, state.figure, state.error = 0, None, None

    def update(_change=None):
        try:
            fig, html = render()
            picture.value = figure_png(fig, dpi)
            caption.value = html
            state.figure, state.error = fig, None
        except Exception as exc:  # shown in the widget rather than lost in the widget state
            state.error = exc
            caption.value = f"<pre style='color:#b00'>{type(exc).__name__}: {exc}</pre>"
        state.redraws += 1

    for control in controls.values():
        control.observe(update, names="value")
    layout = widgets.Layout(flex_flow="row wrap")
    box = widgets.VBox([*(widgets.HBox([controls[name] for name in row], layout=layout) for row in rows),
                        caption, picture])
    box.controls, box.state, box.update = controls, state, update
    update()
    return box
