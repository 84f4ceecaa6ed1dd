"""The memory argument for Decoupled SOLO (Wang et al., arXiv 1912.04488 §4): the vanilla head's mask branch outputs
S² maps per level, the decoupled one 2S (S x-maps + S y-maps), at stride/2 of the input.

:func:`mask_branch_output_shapes` gives each level's output shape, :func:`mask_branch_memory` their bytes, for the
dense heads as the paper and the authors' code run them (walkthrough 05 and the ``solo_decoupled`` experiment show
them beside a measured forward pass).
"""
from __future__ import annotations

import math
from typing import List, Sequence

from onestage.modeling.solo import PAPER_GRIDS, PAPER_STRIDES

__all__ = ["mask_branch_output_shapes", "mask_branch_memory"]


def mask_branch_output_shapes(grid_numbers: Sequence[int], strides: Sequence[int], image_hw: Sequence[int],
                              head: str = "vanilla") -> List[tuple]:
    """``(channels, h, w)`` of each level's mask-branch output for a (padded) input of ``image_hw``: masks at
    stride/2, S² channels (vanilla) or 2S (decoupled: S x-maps + S y-maps)."""
    out = []
    for s, st in zip(grid_numbers, strides):
        h, w = math.ceil(image_hw[0] / st) * 2, math.ceil(image_hw[1] / st) * 2
        out.append((s * s if head == "vanilla" else 2 * s, h, w))
    return out


def mask_branch_memory(grid_numbers: Sequence[int] = PAPER_GRIDS, strides: Sequence[int] = PAPER_STRIDES,
                       image_hw: Sequence[int] = (800, 1344), batch_size: int = 1, bytes_per_element: int = 4) -> dict:
    """Memory of the mask-branch *output* tensors, vanilla vs decoupled (paper §4: Decoupled SOLO needs
    "considerably less GPU memory"; the output shrinks from S² to 2S channels per level).

    Returns ``{"vanilla": bytes, "decoupled": bytes, "ratio": vanilla / decoupled, "levels": [{grid, stride,
    vanilla, decoupled}]}`` for ``batch_size`` images of ``image_hw`` (default: the COCO test size 800×1333 padded
    to 800×1344) in float32. Activations inside the towers and gradients come on top; this is the part that
    scales with S².

    This is the dense head as the paper and the authors' code run it. :class:`SOLO` itself computes only the
    channels that its loss or its candidates read (:meth:`SOLOHead.cell_mask_logits`), which removes most of this
    cost for vanilla SOLO too; the decoupled head still needs 2S instead of S² *weights* per level.
    """
    levels = []
    for s, st, v, d in zip(grid_numbers, strides,
                           mask_branch_output_shapes(grid_numbers, strides, image_hw, "vanilla"),
                           mask_branch_output_shapes(grid_numbers, strides, image_hw, "decoupled")):
        levels.append(dict(grid=s, stride=st, vanilla=batch_size * bytes_per_element * math.prod(v),
                           decoupled=batch_size * bytes_per_element * math.prod(d)))
    van = sum(lv["vanilla"] for lv in levels)
    dec = sum(lv["decoupled"] for lv in levels)
    return {"vanilla": van, "decoupled": dec, "ratio": van / dec, "levels": levels}
