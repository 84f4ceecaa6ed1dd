"""BlendMask's blender: merge per-RoI crops of the bases with per-instance attentions into mask logits.

BlendMask (Chen et al., arXiv 2001.00309) §3.2, eqs. 2–4, for each of ``N`` instances:

1. ``a' = interpolate_{M×M→R×R}(a)`` — the ``K×M×M`` top-level attention is resized to the RoI resolution ``R``
   (eq. 2; bilinear by default, ``MODEL.BLENDMASK.TOP_INTERP``; nearest in the paper's early ablations);
2. ``s = softmax_K(a')`` — normalised over the ``K`` bases (eq. 3). **The interpolation comes before the softmax**
   (REFERENCE §3.2), so the softmax sees the R×R values;
3. ``m = Σ_k s_k ∘ r_k`` — weighted sum of the ``K×R×R`` RoI crops ``r`` of the bases (eq. 4): the mask logits.

The blender generalises two earlier assemblers (paper §4.1 "Merging methods: Blender vs. YOLACT vs. FCIS"):

* **YOLACT** (weighted sum): attention size ``M = 1`` — one scalar per basis for the whole RoI;
* **FCIS** (assembler): *fixed one-hot* attentions and *nearest* interpolation — with ``K = g²`` bases and a
  ``g×g`` grid, tile ``(i, j)`` of the RoI is copied from basis ``k = i·g + j``. No softmax (``normalize="none"``):
  the one-hot weights are used as they are. :func:`fcis_attention` builds that attention.

A fourth normalisation follows Table 3's one-basis model (§4.1 "Number of bases": *"the one-basis version uses
sigmoid activation on both the base and the attention map"*): ``normalize="sigmoid"`` with ``K = 1`` returns the
logit of ``σ(a')·σ(r)``, so the loss can stay BCE-with-logits. (A softmax over one basis is the constant 1.)

``blend`` is the entry point the models call; it dispatches to the fastest implementation for the inputs. For now
that is :func:`blend_reference`, the plain PyTorch implementation below, which is also the CPU path and the test
oracle for any GPU kernel added to this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["blend", "blend_reference", "fcis_attention", "INTERPOLATIONS", "NORMALIZATIONS"]

INTERPOLATIONS = ("bilinear", "nearest")
NORMALIZATIONS = ("softmax", "none", "sigmoid")


def _check(bases_rois: Tensor, attns: Tensor, interpolation: str, normalize: str) -> None:
    if bases_rois.dim() != 4 or attns.dim() != 4:
        raise ValueError(f"expected bases_rois N×K×R×R and attns N×K×M×M, got {tuple(bases_rois.shape)} and "
                         f"{tuple(attns.shape)}")
    if bases_rois.shape[:2] != attns.shape[:2]:
        raise ValueError(f"bases_rois {tuple(bases_rois.shape)} and attns {tuple(attns.shape)} disagree on N or K")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "sigmoid" and bases_rois.shape[1] != 1:
        raise ValueError("normalize='sigmoid' is the one-basis variant of BlendMask Table 3 and needs K = 1, "
                         f"got K = {bases_rois.shape[1]}")


def interpolate_attention(attns: Tensor, size, interpolation: str = "bilinear") -> Tensor:
    """``N×K×M×M`` → ``N×K×size`` with ``F.interpolate`` (bilinear: ``align_corners=False``, as AdelaiDet's
    ``F.interpolate(coeffs, (H, W), mode=top_interp)``; nearest: source index ``⌊dst·M/R⌋``, so with ``R`` a
    multiple of ``M`` every attention cell covers an exact ``R/M×R/M`` tile)."""
    if interpolation == "bilinear":
        return F.interpolate(attns, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(attns, size=size, mode="nearest")


def blend_reference(bases_rois: Tensor, attns: Tensor, interpolation: str = "bilinear",
                    normalize: str = "softmax") -> Tensor:
    """Mask logits ``N×R×R`` from RoI crops of the bases ``N×K×R×R`` and attentions ``N×K×M×M`` (module docstring).

    ``interpolation``: ``"bilinear"`` | ``"nearest"`` (attention M×M → R×R). ``normalize``: ``"softmax"`` over K
    (BlendMask, YOLACT-as-M=1), ``"none"`` (weights used as given: FCIS's fixed one-hot attention), ``"sigmoid"``
    (K = 1 only: logit of σ(a')·σ(r), BlendMask Table 3). ``N = 0`` gives an empty ``0×R×R`` tensor.

    Cost per RoI, softmax + bilinear, ``K`` bases, ``M×M`` attention, ``R×R`` output, counting a multiply, an add,
    an exp, a divide or a max as one FLOP each:

    * FLOPs ≈ ``K·R²·(7 + 5 + 2) = 14·K·R²`` — bilinear resize 7 per output value (4 multiplies, 3 adds with
      precomputed weights), softmax ≈ 5 per value (max, subtract, exp, sum, divide), weighted sum 2 per value
      (multiply + add). K = 4, R = 56: ≈ 176 k FLOPs; the eq. 4 weighted sum alone is ``2·K·R²`` ≈ 25 k
      (``K·R²`` ≈ 12.5 k multiply-adds, the "less than 10K FLOPs per RoI" order of magnitude of the authors'
      slides, seed file line 143).
    * Bytes moved, this implementation (fp32, every step a separate kernel that writes its result to memory):
      read the attention ``4·K·M²``; write the interpolated attention ``4·K·R²``; softmax reads and writes
      ``2·4·K·R²``; the product reads softmax and crops and writes ``3·4·K·R²``; the sum reads ``4·K·R²`` and writes
      the logits ``4·R²``: in all ``4·(K·M² + 7·K·R² + R²)`` ≈ 367 kB per RoI at K = 4, M = 14, R = 56.
      A fused kernel reads the attention and the crops once and writes only the logits:
      ``4·(K·M² + K·R² + R²)`` ≈ 66 kB — about 5.5× less traffic for the same FLOPs.
    """
    _check(bases_rois, attns, interpolation, normalize)
    n, k, r_h, r_w = bases_rois.shape
    if n == 0:
        return bases_rois.new_zeros((0, r_h, r_w)) + attns.sum() * 0
    attns = interpolate_attention(attns.to(bases_rois.dtype), (r_h, r_w), interpolation)  # eq. 2
    if normalize == "sigmoid":
        # log σ(a') + log σ(r) = log p; logit(p) = log p − log(1 − p), with 1 − p = −expm1(log p). Clamping log p
        # below 0 keeps the logit finite (≤ ~16) where both sigmoids round to 1.
        log_p = (F.logsigmoid(attns) + F.logsigmoid(bases_rois)).clamp(max=-1e-7)
        return (log_p - torch.log(-torch.expm1(log_p)))[:, 0]
    if normalize == "softmax":
        attns = attns.softmax(dim=1)  # eq. 3, over the K bases, after the interpolation
    return (attns * bases_rois).sum(dim=1)  # eq. 4


def blend(bases_rois: Tensor, attns: Tensor, interpolation: str = "bilinear", normalize: str = "softmax") -> Tensor:
    """The blender (module docstring), dispatching to the fastest implementation for the inputs' device.

    Every case currently runs :func:`blend_reference`.
    """
    return blend_reference(bases_rois, attns, interpolation, normalize)


def fcis_attention(grid: int, num_instances: int = 1, device=None, dtype=torch.float32) -> Tensor:
    """FCIS's fixed one-hot attention as a blender input: ``num_instances×grid²×grid×grid`` with
    ``A[:, i·grid + j, i, j] = 1`` — basis ``k = i·grid + j`` owns tile ``(i, j)`` (row ``i``, column ``j``) of the
    RoI. With ``interpolation="nearest"`` and ``normalize="none"`` the blender then assembles position-sensitive
    crops exactly as FCIS does (BlendMask §4.1: "fixed one-hot blending attentions and nearest neighbour top-level
    interpolation")."""
    eye = torch.eye(grid * grid, device=device, dtype=dtype).reshape(grid * grid, grid, grid)
    return eye.unsqueeze(0).expand(num_instances, -1, -1, -1)
