"""Exercise checks for the walkthrough notebooks 01–05: write a small function, hand it to ``check_<name>``.

Every check runs the student's function on a few hand-made cases (expected values computed by hand and written as
literals) and on small random cases whose expected values come from **the library's own implementation** — the
functions the models train and infer with — and prints (and returns) a :class:`CheckResult`: ``passed: N cases``,
or the first failing case with its input, the expected and the obtained value (for tensors: the first index where
they differ) and a hint naming the paper's section. Nothing here re-implements the references; reference solutions
written as a student would write them live in :mod:`onestage.teach.solutions`.

Reading guide, notebook by notebook (papers by arXiv id and section):

* 01, FCOS (arXiv 1904.01355): :func:`check_locations` (§3.1, the point ``⌊s/2⌋ + x·s`` of a feature cell),
  :func:`check_ltrb_targets` (§3.1 eq. 1), :func:`check_fpn_levels` (§3.2, ``m_{i−1} ≤ max(l,t,r,b) ≤ m_i``),
  :func:`check_center_sampling` (the journal version, arXiv 2006.09214: ``centre ± 1.5·stride`` clipped to the box).
* 02, FCOS center-ness: :func:`check_centerness_target` (§3.3 eq. 3), :func:`check_spearman` (the rank
  correlation the notebook relates center-ness and IoU with), :func:`check_final_score` (§3.3, ``sqrt(cls·ctr)``).
* 03, BlendMask (arXiv 2001.00309): :func:`check_blend` (§3.2 eqs. 2–4: interpolate, then softmax over the bases,
  then the weighted sum), :func:`check_yolact_blend` and :func:`check_fcis_attention` (§4.1, YOLACT and FCIS as
  special cases of the blender).
* 04, CondInst (arXiv 2003.05664): :func:`check_num_dynamic_params` (§3.2, 169 at the defaults),
  :func:`check_parse_dynamic_params` (weights first, then biases), :func:`check_relative_coordinates` (§2.2),
  :func:`check_dynamic_head` (§2: 1×1 convs with ReLU between them).
* 05, SOLO (arXiv 1912.04488) and SOLOv2 (arXiv 2003.10152): :func:`check_assign_levels` (SOLO §3.2, FPN scale
  ranges on ``sqrt(w·h)``), :func:`check_center_region` (SOLO §3.2, the centre region with σ = 0.2),
  :func:`check_matrix_nms_decay` (SOLOv2 §3.3, the decay with its compensation).

All checks share :func:`_run` (call the function on each case, stop at the first mismatch) and :func:`_difference`
(compare a value with the expected one: tensors element by element within a tolerance, sequences item by item).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from onestage.analysis.centerness import spearman as _lib_spearman
from onestage.analysis.condinst import dynamic_head_layers
from onestage.modeling.fcos import (FCOSHeadOutputs, assign_targets, centerness_target, compute_locations,
                                    location_candidates, postprocess)
from onestage.modeling.solo import assign_levels, center_region_cells, matrix_nms_decay
from onestage.ops.blender import blend_reference, fcis_attention
from onestage.ops.dynamic_mask_head import coordinate_maps, num_dynamic_params, parse_dynamic_params

__all__ = ["CheckResult", "check_locations", "check_ltrb_targets", "check_fpn_levels", "check_center_sampling",
           "check_centerness_target", "check_spearman", "check_final_score", "check_blend", "check_yolact_blend",
           "check_fcis_attention", "check_num_dynamic_params", "check_parse_dynamic_params",
           "check_relative_coordinates", "check_dynamic_head", "check_assign_levels", "check_center_region",
           "check_matrix_nms_decay", "CHECKS"]

INF = float("inf")


# ---------------------------------------------------------------------------------------------------------------
# The report and the shared helpers
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class CheckResult:
    """Outcome of one check: ``passed`` and the number of ``cases`` run; on a failure, the failing case's
    ``inputs``, ``expected`` and ``got`` (as text, ``got`` saying where it differs), the ``hint``, and the
    inputs themselves in ``case_inputs`` (to rerun your function on them)."""

    name: str
    passed: bool
    cases: int
    inputs: str = ""
    expected: str = ""
    got: str = ""
    hint: str = ""
    case_inputs: Optional[dict] = field(default=None, repr=False)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        if self.passed:
            return f"{self.name}: passed: {self.cases} cases"
        lines = [f"{self.name}: FAILED on case {self.cases}", f"  input:    {self.inputs}",
                 f"  expected: {self.expected}", f"  got:      {self.got}", f"  hint:     {self.hint}"]
        if "tensor of shape" in self.inputs:
            lines.append("  (the returned result's .case_inputs holds the full inputs)")
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class Case:
    """One call: keyword ``inputs`` for the student's function, the ``expected`` value, a ``label`` naming the
    case and an optional ``hint`` for this case (the check's hint otherwise)."""

    label: str
    inputs: dict
    expected: Any
    hint: Optional[str] = None


def _fmt(v: Any) -> str:
    """Short text of an input or a result: small tensors in full (4 decimals), large ones by shape."""
    if isinstance(v, Tensor):
        if v.numel() <= 48:
            data = v.tolist()
            if v.is_floating_point():
                data = _round(data)
            return f"tensor({data})" if v.dim() else f"{data}"
        return f"tensor of shape {tuple(v.shape)}"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        items = ", ".join(_fmt(x) for x in v)
        return f"[{items}]" if isinstance(v, list) else f"({items}{',' if len(v) == 1 else ''})"
    return repr(v)


def _element(v: Tensor) -> str:
    return f"{float(v):.6g}" if v.is_floating_point() else _fmt(v)


def _round(data):
    if isinstance(data, list):
        return [_round(x) for x in data]
    return round(data, 4) if isinstance(data, float) else data


def _difference(expected: Any, got: Any, atol: float, where: str = "") -> Optional[tuple]:
    """``None`` when ``got`` matches ``expected``, else ``(expected text, got text)`` naming the first mismatch."""
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor):
            return f"a tensor{_at(where)}", f"{type(got).__name__}{_at(where)}: {_fmt(got)}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"shape {tuple(expected.shape)}{_at(where)}", f"shape {tuple(got.shape)}{_at(where)}"
        e, g = expected.detach().cpu(), got.detach().cpu()
        if e.dtype == torch.bool:
            bad = e != g.bool()
        else:
            e, g = e.double(), g.double()
            bad = ~torch.isclose(g, e, rtol=1e-4, atol=atol, equal_nan=True)
        if not bad.any():
            return None
        idx = tuple(int(i) for i in bad.nonzero()[0])
        at = ", ".join(([f"item {where}"] if where else []) + ([f"index {list(idx)}"] if idx else []))
        at = f" at {at}" if at else ""
        return (f"{_element(expected[idx])}{at}   (all: {_fmt(expected)})",
                f"{_element(got[idx])}{at}   (all: {_fmt(got)})")
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            n = len(got) if isinstance(got, (list, tuple)) else None
            return (f"a sequence of {len(expected)} items{_at(where)}",
                    f"{type(got).__name__}{'' if n is None else f' of {n} items'}{_at(where)}")
        for i, (e, g) in enumerate(zip(expected, got)):
            diff = _difference(e, g, atol, f"{where}[{i}]")
            if diff is not None and not where and not any(isinstance(x, (Tensor, list, tuple)) for x in expected):
                diff = (f"{diff[0]}   (all: {_fmt(tuple(expected))})", f"{diff[1]}   (all: {_fmt(tuple(got))})")
            if diff is not None:
                return diff
        return None
    if isinstance(expected, float):
        try:
            g = float(got)
        except (TypeError, ValueError):
            return f"{expected:.6g}{_at(where)}", f"{got!r}{_at(where)}"
        if math.isclose(g, expected, rel_tol=1e-4, abs_tol=atol) or (math.isnan(g) and math.isnan(expected)):
            return None
        return f"{expected:.6g}{_at(where)}", f"{g:.6g}{_at(where)}"
    ok = got == expected
    if isinstance(ok, Tensor):
        ok = bool(ok.all())
    return None if ok else (f"{_fmt(expected)}{_at(where)}", f"{_fmt(got)}{_at(where)}")


def _at(where: str) -> str:
    return f" at item {where}" if where else ""


def _copy(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.clone()
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _run(name: str, fn: Callable, cases: Sequence[Case], hint: str, atol: float = 1e-5,
         verbose: bool = True) -> CheckResult:
    """Call ``fn(**case.inputs)`` on every case in order; stop at the first mismatch (or exception)."""
    result = CheckResult(name, True, len(cases))
    for n, case in enumerate(cases, start=1):
        try:
            got = fn(**{k: _copy(v) for k, v in case.inputs.items()})
        except NotImplementedError:
            diff = _fmt(case.expected), "NotImplementedError (not written yet)"
        except Exception as exc:  # noqa: BLE001 — the student's error is part of the report
            diff = _fmt(case.expected), f"raised {type(exc).__name__}: {exc}"
        else:
            diff = _difference(case.expected, got, atol)
        if diff is not None:
            call = ", ".join(f"{k}={_fmt(v)}" for k, v in case.inputs.items())
            result = CheckResult(name, False, n, f"{case.label}: {_name_of(fn)}({call})", diff[0], diff[1],
                                 case.hint or hint, case.inputs)
            break
    if verbose:
        print(result)
    return result


def _name_of(fn: Callable) -> str:
    return getattr(fn, "__name__", "your_function")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand_boxes(g: torch.Generator, m: int, lo: float = 0.0, hi: float = 128.0) -> Tensor:
    a = torch.randint(int(lo), int(hi), (m, 2, 2), generator=g).float()
    x0, x1 = a[:, 0].min(1).values, a[:, 0].max(1).values + 1
    y0, y1 = a[:, 1].min(1).values, a[:, 1].max(1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Notebook 01 — FCOS: locations, regression targets, FPN levels, center sampling
# ---------------------------------------------------------------------------------------------------------------

def check_locations(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(height, width, stride)`` → ``(H·W)×2`` float image points (x, y) of a stride-``s`` feature map,
    row-major (x varies fastest). Compared with :func:`onestage.modeling.fcos.compute_locations`."""
    cases = [Case("hand-made, 2×2 map at stride 8", dict(height=2, width=2, stride=8),
                  torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]]))]
    g = _gen(0)
    for k in range(6):
        h, w = (int(v) for v in torch.randint(1, 5, (2,), generator=g))
        s = (8, 16, 32, 64, 128)[k % 5]
        cases.append(Case(f"random case {k + 1}", dict(height=h, width=w, stride=s),
                          compute_locations([(h, w)], [s])[0]))
    return _run("check_locations", fn, cases,
                "FCOS §3.1: cell (x, y) of a stride-s map stands for the image point (⌊s/2⌋ + x·s, ⌊s/2⌋ + y·s); "
                "rows of the result are row-major (x varies fastest) and hold x first, then y.", verbose=verbose)


def check_ltrb_targets(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(locations, boxes)`` with ``locations`` ``L×2`` (x, y) and ``boxes`` ``M×4`` xyxy → ``L×M×4``
    (l, t, r, b) in pixels. Compared with the ``ltrb`` of :func:`onestage.modeling.fcos.location_candidates`."""
    cases = [Case("hand-made, one location, one box", dict(locations=torch.tensor([[20.0, 30.0]]),
                                                          boxes=torch.tensor([[0.0, 0.0, 64.0, 48.0]])),
                  torch.tensor([[[20.0, 30.0, 44.0, 18.0]]]))]
    g = _gen(1)
    for k in range(5):
        locs = torch.randint(0, 128, (3, 2), generator=g).float()
        boxes = _rand_boxes(g, 2)
        cases.append(Case(f"random case {k + 1}", dict(locations=locs, boxes=boxes),
                          location_candidates(locs, boxes, 8, -1.0, INF, center_sampling=False)[0]))
    return _run("check_ltrb_targets", fn, cases,
                "FCOS §3.1 eq. 1: l = x − x0, t = y − y0, r = x1 − x, b = y1 − y, in that order (the distances from "
                "the location to the left, top, right and bottom sides); negative outside the box.", verbose=verbose)


def _levels_by_assignment(max_reg: Tensor, sizes_of_interest: Sequence[float]) -> Tensor:
    """``N×L`` bool from :func:`assign_targets`: one image per value, a box around the location (0, 0) whose
    largest regression target is that value, every level holding just that location, no center sampling."""
    num_levels = len(sizes_of_interest) + 1
    locations = [torch.zeros(1, 2)] * num_levels
    targets = [{"boxes": torch.tensor([[-float(m), -0.5, 0.5, 0.5]]), "labels": torch.zeros(1, dtype=torch.long)}
               for m in max_reg.tolist()]
    assigned = assign_targets(locations, targets, num_classes=1, strides=[8] * num_levels,
                              sizes_of_interest=sizes_of_interest, center_sampling=False)
    return assigned.labels == 0


def check_fpn_levels(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(max_reg, sizes_of_interest=(64, 128, 256, 512))`` with ``max_reg`` ``N`` (pixels) → ``N×L`` bool,
    ``L = len(sizes_of_interest) + 1``: may a location with this ``max(l*, t*, r*, b*)`` be a positive on level i?
    Compared with what :func:`onestage.modeling.fcos.assign_targets` decides."""
    soi = (64, 128, 256, 512)
    t, f = True, False
    hand = [(10.0, [t, f, f, f, f]), (64.0, [t, t, f, f, f]), (100.0, [f, t, f, f, f]), (512.0, [f, f, f, t, t]),
            (600.0, [f, f, f, f, t])]
    cases = [Case(f"hand-made, max_reg = {m:g}", dict(max_reg=torch.tensor([m]), sizes_of_interest=soi),
                  torch.tensor([row]),
                  hint=("FCOS §3.2: both ends of a range are inclusive (m_{i−1} ≤ max ≤ m_i), so a value on a "
                        "boundary fits two levels." if m in (64.0, 512.0) else None)) for m, row in hand]
    g = _gen(2)
    for k, sizes in enumerate([soi, soi, (32, 64, 128, 256), (100, 200)]):
        max_reg = torch.cat([torch.randint(1, 1000, (4,), generator=g).float(), torch.tensor([float(sizes[0])])])
        cases.append(Case(f"random case {k + 1}", dict(max_reg=max_reg, sizes_of_interest=sizes),
                          _levels_by_assignment(max_reg, sizes)))
    return _run("check_fpn_levels", fn, cases,
                "FCOS §3.2: level i (P3, P4, ...) keeps a location when m_{i−1} ≤ max(l*, t*, r*, b*) ≤ m_i, with "
                "m = (0, *sizes_of_interest, ∞); inclusive at both ends.", verbose=verbose)


def check_center_sampling(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(locations, boxes, strides, radius=1.5)`` with ``locations`` ``L×2``, ``boxes`` ``M×4`` xyxy and
    ``strides`` ``L`` → ``L×M`` bool: is the location strictly inside the box's centre square ``c ± radius·stride``
    clipped to the box? Compared with :func:`onestage.modeling.fcos.location_candidates` (scale test disabled)."""
    box = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    small = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    cases = [
        Case("hand-made, the box centre", dict(locations=torch.tensor([[50.0, 50.0]]), boxes=box,
                                               strides=torch.tensor([8.0]), radius=1.5), torch.tensor([[True]])),
        Case("hand-made, 1.5 strides right of the centre (on the square's border)",
             dict(locations=torch.tensor([[62.0, 50.0]]), boxes=box, strides=torch.tensor([8.0]), radius=1.5),
             torch.tensor([[False]]), hint="Center sampling (FCOS journal version, arXiv 2006.09214) keeps "
                                           "locations strictly inside the square: one on its border is not a "
                                           "candidate (all four distances must be > 0)."),
        Case("hand-made, outside a small box but within 1.5 strides of its centre",
             dict(locations=torch.tensor([[15.0, 5.0]]), boxes=small, strides=torch.tensor([8.0]), radius=1.5),
             torch.tensor([[False]]), hint="The centre square is clipped to the box (AdelaiDet get_sample_region; "
                                           "FCOS journal version arXiv 2006.09214): it never reaches outside the "
                                           "object."),
    ]
    g = _gen(3)
    for k in range(5):
        locs = torch.randint(0, 128, (6, 2), generator=g).float()
        strides = torch.tensor([8.0, 8.0, 16.0, 16.0, 32.0, 32.0])
        boxes = _rand_boxes(g, 3)
        radius = (1.5, 1.5, 1.0, 2.5, 1.5)[k]
        cases.append(Case(f"random case {k + 1}", dict(locations=locs, boxes=boxes, strides=strides, radius=radius),
                          location_candidates(locs, boxes, strides, -1.0, INF, True, radius)[1]))
    return _run("check_center_sampling", fn, cases,
                "Center sampling (FCOS journal version arXiv 2006.09214; AdelaiDet POS_RADIUS = 1.5): the square "
                "(cx ± radius·stride, cy ± radius·stride) is clipped to the box, and the location must be strictly "
                "inside it.", verbose=verbose)


# ---------------------------------------------------------------------------------------------------------------
# Notebook 02 — center-ness
# ---------------------------------------------------------------------------------------------------------------

def check_centerness_target(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(ltrb)`` with ``ltrb`` ``...×4`` (positive distances) → ``...`` center-ness in [0, 1]. Compared with
    :func:`onestage.modeling.fcos.centerness_target`."""
    cases = [Case("hand-made, the centre of a box", dict(ltrb=torch.tensor([[10.0, 10.0, 10.0, 10.0]])),
                  torch.tensor([1.0])),
             Case("hand-made, off-centre horizontally", dict(ltrb=torch.tensor([[5.0, 10.0, 15.0, 10.0]])),
                  torch.tensor([math.sqrt(1 / 3)])),
             Case("hand-made, off-centre both ways", dict(ltrb=torch.tensor([[1.0, 2.0, 3.0, 4.0]])),
                  torch.tensor([math.sqrt(1 / 6)]))]
    g = _gen(4)
    for k in range(4):
        ltrb = torch.rand((5, 4), generator=g) * (200.0 if k % 2 else 8.0) + 0.1
        cases.append(Case(f"random case {k + 1}{' (stride units)' if not k % 2 else ''}", dict(ltrb=ltrb),
                          centerness_target(ltrb)))
    return _run("check_centerness_target", fn, cases,
                "FCOS §3.3 eq. 3: centerness = sqrt( min(l, r)/max(l, r) · min(t, b)/max(t, b) ); the square root "
                "slows the decay away from the centre.", verbose=verbose)


def check_spearman(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(a, b)`` with two 1-D tensors of the same length (≥ 2, not constant) → float, Spearman's rank
    correlation. Compared with :func:`onestage.analysis.centerness.spearman`."""
    cases = [Case("hand-made, increasing together", dict(a=torch.tensor([1.0, 2.0, 3.0]),
                                                         b=torch.tensor([10.0, 20.0, 30.0])), 1.0),
             Case("hand-made, reversed", dict(a=torch.tensor([1.0, 2.0, 3.0]), b=torch.tensor([3.0, 2.0, 1.0])),
                  -1.0),
             Case("hand-made, a tie", dict(a=torch.tensor([1.0, 1.0, 2.0]), b=torch.tensor([1.0, 2.0, 3.0])),
                  math.sqrt(3) / 2, hint="Tied values share the average of the ranks they occupy: a = (1, 1, 2) has "
                                         "ranks (1.5, 1.5, 3).")]
    g = _gen(5)
    for k in range(4):
        a = torch.randint(0, 5, (8,), generator=g).float()
        b = a + torch.randint(-3, 4, (8,), generator=g).float()
        cases.append(Case(f"random case {k + 1}", dict(a=a, b=b), _lib_spearman(a, b)))
    return _run("check_spearman", fn, cases,
                "Spearman's ρ is the Pearson correlation of the ranks of a and of b (ties get the average rank); the "
                "notebook's section 3 uses it to ask whether a score and IoU order the candidates alike.",
                verbose=verbose)


def _postprocess_scores(seed: int):
    """The class and center-ness probabilities at each detection of ``postprocess`` on random head outputs (one
    level, every candidate kept), and the scores ``postprocess`` gave them."""
    g = _gen(seed)
    c, h, w, s = 3, 3, 4, 8
    logits = torch.randn((1, c, h, w), generator=g)
    ctr = torch.randn((1, 1, h, w), generator=g)
    reg = torch.ones((1, 4, h, w))
    head = FCOSHeadOutputs([logits], [reg], [ctr], [torch.zeros(1)])
    locs = compute_locations([(h, w)], [s])
    det = postprocess(head, locs, [s], [(1000, 1000)], score_thresh=0.0, nms_thresh=1.0, detections_per_img=1000,
                      return_indices=True)[0]
    cls = logits[0].reshape(c, -1).sigmoid()[det["labels"], det["location_inds"]]
    ctr_p = ctr[0, 0].reshape(-1).sigmoid()[det["location_inds"]]
    return cls, ctr_p, det["scores"]


def check_final_score(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(cls, ctr)`` with class-score and center-ness probabilities (tensors of the same shape) → the score a
    detection is ranked and reported by. Compared with the scores of :func:`onestage.modeling.fcos.postprocess`."""
    cases = [Case("hand-made", dict(cls=torch.tensor([0.81, 0.5]), ctr=torch.tensor([0.25, 0.5])),
                  torch.tensor([0.45, 0.5]))]
    for k in range(3):
        cls, ctr, scores = _postprocess_scores(10 + k)
        cases.append(Case(f"random case {k + 1} (the detections of postprocess)", dict(cls=cls, ctr=ctr), scores))
    return _run("check_final_score", fn, cases,
                "FCOS §3.3 ranks by the product of the class score and the predicted center-ness; the library, like "
                "the authors' code, takes its square root, sqrt(cls · ctr), which keeps the score on the scale of a "
                "probability.", verbose=verbose)


# ---------------------------------------------------------------------------------------------------------------
# Notebook 03 — BlendMask's blender
# ---------------------------------------------------------------------------------------------------------------

def check_blend(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(bases_rois, attns)`` with ``bases_rois`` ``N×K×R×R`` and ``attns`` ``N×K×M×M`` (logits) → ``N×R×R``
    mask logits. Compared with :func:`onestage.ops.blender.blend_reference` (bilinear, softmax)."""
    ones = torch.ones(1, 1, 2, 2)
    cases = [Case("hand-made, equal attention", dict(bases_rois=torch.cat([ones, 3 * ones], 1),
                                                    attns=torch.zeros(1, 2, 1, 1)), torch.full((1, 2, 2), 2.0))]
    g = _gen(6)
    for k, (n, kk, m, r) in enumerate([(1, 2, 2, 4), (2, 4, 3, 6), (2, 3, 2, 5), (1, 4, 4, 8)]):
        bases = torch.randn((n, kk, r, r), generator=g)
        attns = 3 * torch.randn((n, kk, m, m), generator=g)
        cases.append(Case(f"random case {k + 1}", dict(bases_rois=bases, attns=attns), blend_reference(bases, attns)))
    return _run("check_blend", fn, cases,
                "BlendMask §3.2 eqs. 2–4: first resize the attention M×M → R×R (bilinear, align_corners=False), "
                "then softmax over the K bases at every pixel, then sum_k s_k ∘ r_k. The order matters: softmax "
                "before the interpolation gives other weights.", verbose=verbose)


def check_yolact_blend(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(bases_rois, coeffs)`` with ``bases_rois`` ``N×K×R×R`` and ``coeffs`` ``N×K`` (one logit per basis)
    → ``N×R×R``. Compared with :func:`onestage.ops.blender.blend_reference` on a 1×1 attention."""
    ones = torch.ones(1, 1, 2, 2)
    cases = [Case("hand-made", dict(bases_rois=torch.cat([ones, 3 * ones], 1),
                                    coeffs=torch.tensor([[0.0, math.log(3.0)]])), torch.full((1, 2, 2), 2.5))]
    g = _gen(7)
    for k, (n, kk, r) in enumerate([(1, 2, 3), (2, 4, 4), (3, 3, 5)]):
        bases = torch.randn((n, kk, r, r), generator=g)
        coeffs = 2 * torch.randn((n, kk), generator=g)
        cases.append(Case(f"random case {k + 1}", dict(bases_rois=bases, coeffs=coeffs),
                          blend_reference(bases, coeffs[:, :, None, None])))
    return _run("check_yolact_blend", fn, cases,
                "BlendMask §4.1: the blender with a 1×1 attention degenerates to YOLACT — one coefficient per basis "
                "for the whole RoI; the blender normalises the K coefficients with a softmax, then takes the "
                "weighted sum of the bases.", verbose=verbose)


def check_fcis_attention(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(grid)`` → ``grid²×grid×grid`` float one-hot attention of FCIS (one instance). Compared with
    :func:`onestage.ops.blender.fcis_attention`."""
    hand = torch.zeros(4, 2, 2)
    hand[0, 0, 0] = hand[1, 0, 1] = hand[2, 1, 0] = hand[3, 1, 1] = 1.0
    cases = [Case("hand-made, 2×2 grid", dict(grid=2), hand)]
    cases += [Case(f"grid {gr}", dict(grid=gr), fcis_attention(gr)[0]) for gr in (1, 3, 4)]
    return _run("check_fcis_attention", fn, cases,
                "BlendMask §4.1: FCIS is the blender with fixed one-hot attention — basis k = i·g + j owns tile "
                "(i, j) of the RoI, i the row and j the column.", verbose=verbose)


# ---------------------------------------------------------------------------------------------------------------
# Notebook 04 — CondInst's dynamic mask heads
# ---------------------------------------------------------------------------------------------------------------

def check_num_dynamic_params(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(mask_channels=8, channels=8, num_layers=3, rel_coords=True)`` → int, the length of the controller's
    output. Compared with :func:`onestage.ops.dynamic_mask_head.num_dynamic_params`."""
    cases = [Case("hand-made, the defaults", dict(mask_channels=8, channels=8, num_layers=3, rel_coords=True), 169),
             Case("hand-made, without coordinates", dict(mask_channels=8, channels=8, num_layers=3,
                                                         rel_coords=False), 153)]
    g = _gen(8)
    for k in range(5):
        mc, ch = (int(v) for v in torch.randint(1, 17, (2,), generator=g))
        nl = int(torch.randint(1, 5, (1,), generator=g))
        rel = bool(k % 2 == 0)
        cases.append(Case(f"random case {k + 1}", dict(mask_channels=mc, channels=ch, num_layers=nl, rel_coords=rel),
                          num_dynamic_params(mc, ch, nl, "rel" if rel else "none")))
    return _run("check_num_dynamic_params", fn, cases,
                "CondInst §3.2: sum over the layers of C_out·C_in (weights) + C_out (biases); the first layer reads "
                "mask_channels + 2 relative-coordinate channels, hidden layers have `channels` outputs, the last "
                "outputs 1 channel — 169 at the defaults.", verbose=verbose)


def check_parse_dynamic_params(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(params, in_channels, channels, num_layers)`` with ``params`` ``N×P`` → ``(weights, biases)``: lists
    of ``N×C_out×C_in`` and ``N×C_out`` tensors. Compared with
    :func:`onestage.ops.dynamic_mask_head.parse_dynamic_params`."""
    hand_params = torch.arange(9.0)[None]  # in 2 → out 2 → out 1: W0 (4), W1 (2), b0 (2), b1 (1)
    cases = [Case("hand-made, 2 → 2 → 1", dict(params=hand_params, in_channels=2, channels=2, num_layers=2),
                  ([torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), torch.tensor([[[4.0, 5.0]]])],
                   [torch.tensor([[6.0, 7.0]]), torch.tensor([[8.0]])]))]
    g = _gen(9)
    for k, (n, cin, ch, nl) in enumerate([(2, 10, 8, 3), (3, 4, 3, 2), (1, 6, 5, 4)]):
        p = sum(o * i + o for o, i in zip([ch] * (nl - 1) + [1], [cin] + [ch] * (nl - 1)))
        params = torch.randn((n, p), generator=g)
        w, b = parse_dynamic_params(params, cin, ch, nl)
        cases.append(Case(f"random case {k + 1}", dict(params=params, in_channels=cin, channels=ch, num_layers=nl),
                          (w, b)))
    return _run("check_parse_dynamic_params", fn, cases,
                "CondInst §2.2 and the authors' layout (AdelaiDet parse_dynamic_params): all the weights first, "
                "layer after layer (each C_out×C_in, row-major), then all the biases; the last layer has one output channel.", verbose=verbose)


def check_relative_coordinates(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(location, size_of_interest, height, width, stride)`` with ``location`` a 2-tensor (x, y) in input
    pixels → ``2×H×W`` relative coordinates (x, y) of the head's input. Compared with
    :func:`onestage.ops.dynamic_mask_head.coordinate_maps`."""
    cases = [Case("hand-made", dict(location=torch.tensor([12.0, 4.0]), size_of_interest=64.0, height=1, width=2,
                                    stride=8), torch.tensor([[[0.125, 0.0]], [[0.0, 0.0]]]))]
    g = _gen(11)
    for k in range(4):
        h, w = (int(v) for v in torch.randint(1, 6, (2,), generator=g))
        stride = (8, 4, 8, 16)[k]
        loc = torch.rand(2, generator=g) * torch.tensor([w * stride, h * stride])
        soi = (64.0, 128.0, 256.0, 512.0)[k]
        cases.append(Case(f"random case {k + 1}", dict(location=loc, size_of_interest=soi, height=h, width=w,
                                                      stride=stride),
                          coordinate_maps(loc[None], torch.tensor([soi]), h, w, stride)[0]))
    return _run("check_relative_coordinates", fn, cases,
                "CondInst §2.2: the relative coordinates are (location − pixel) / size_of_interest, where pixel = "
                "(⌊s/2⌋ + x·s, ⌊s/2⌋ + y·s) is each mask-feature cell's image point and size_of_interest belongs to "
                "the instance's FPN level; channel 0 is x, channel 1 is y.", verbose=verbose)


def check_dynamic_head(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(head_input, weights, biases)`` with ``head_input`` ``C_in×H×W`` and per-layer ``C_out×C_in`` weights
    and ``C_out`` biases → ``H×W`` mask logits of one instance. Compared with
    :func:`onestage.analysis.condinst.dynamic_head_layers`."""
    hand_in = torch.tensor([[[1.0, -1.0]], [[2.0, 0.0]]])  # 2×1×2
    hand_w = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, -1.0]])]
    hand_b = [torch.tensor([0.0, -1.0]), torch.tensor([0.5])]
    # layer 1: (1, 1) and (−1, −1) → ReLU (1, 1), (0, 0); layer 2: 1 − 1 + 0.5, 0 − 0 + 0.5
    cases = [Case("hand-made, 2 → 2 → 1", dict(head_input=hand_in, weights=hand_w, biases=hand_b),
                  torch.tensor([[0.5, 0.5]]))]
    g = _gen(12)
    for k, (cin, ch, nl, h, w) in enumerate([(10, 8, 3, 3, 4), (4, 3, 2, 2, 2), (6, 5, 4, 3, 3)]):
        dims = [cin] + [ch] * (nl - 1) + [1]
        weights = [torch.randn((o, i), generator=g) for i, o in zip(dims[:-1], dims[1:])]
        biases = [torch.randn((o,), generator=g) for o in dims[1:]]
        x = torch.randn((cin, h, w), generator=g)
        cases.append(Case(f"random case {k + 1}", dict(head_input=x, weights=weights, biases=biases),
                          dynamic_head_layers(x, weights, biases)[1]))
    return _run("check_dynamic_head", fn, cases,
                "CondInst §2: every layer is a 1×1 conv — the matrix C_out×C_in applied at each pixel — plus its "
                "bias, with a ReLU between layers but none after the last (the output is a logit).",
                atol=1e-4, verbose=verbose)


# ---------------------------------------------------------------------------------------------------------------
# Notebook 05 — SOLO grids and SOLOv2's Matrix NMS
# ---------------------------------------------------------------------------------------------------------------

SOLO_SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))


def check_assign_levels(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(boxes, scale_ranges)`` with ``boxes`` ``M×4`` xyxy → ``M×L`` bool: does level l's scale range contain
    the box's scale? Compared with :func:`onestage.modeling.solo.assign_levels`."""
    t, f = True, False
    cases = [Case("hand-made, a 96×96 box", dict(boxes=torch.tensor([[0.0, 0.0, 96.0, 96.0]]),
                                                 scale_ranges=SOLO_SCALE_RANGES), torch.tensor([[t, t, t, f, f]])),
             Case("hand-made, a thin 50×200 box", dict(boxes=torch.tensor([[0.0, 0.0, 50.0, 200.0]]),
                                                       scale_ranges=SOLO_SCALE_RANGES),
                  torch.tensor([[f, t, t, f, f]]),
                  hint="SOLO §3.2: the scale of a w×h box is sqrt(w·h) (here 100), not its longer side.")]
    g = _gen(13)
    for k in range(4):
        boxes = _rand_boxes(g, 4, 0, 900)
        cases.append(Case(f"random case {k + 1}", dict(boxes=boxes, scale_ranges=SOLO_SCALE_RANGES),
                          assign_levels(boxes, SOLO_SCALE_RANGES)))
    return _run("check_assign_levels", fn, cases,
                "SOLO §3.2 (with FPN): an object goes to every level whose scale range (lo, hi) contains "
                "sqrt(w·h) of its box, inclusive at both ends; the ranges overlap.", verbose=verbose)


def _random_mask(g: torch.Generator, h: int, w: int) -> tuple:
    """An L-shaped mask (two overlapping rectangles) and its box, so that its centre of mass is not its box's."""
    mask = torch.zeros(h, w)
    for _ in range(2):
        y0, x0 = int(torch.randint(0, h - 8, (1,), generator=g)), int(torch.randint(0, w - 8, (1,), generator=g))
        y1 = y0 + int(torch.randint(4, h - y0 + 1, (1,), generator=g))
        x1 = x0 + int(torch.randint(4, w - x0 + 1, (1,), generator=g))
        mask[y0:y1, x0:x1] = 1
    ys, xs = mask.nonzero().unbind(1)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return mask, box


def check_center_region(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(mask, box, canvas_hw, num_grid, sigma=0.2)`` → ``(top, bottom, left, right)``: the rows and columns
    (inclusive) of the S×S grid the object claims. Compared with :func:`onestage.modeling.solo.center_region_cells`."""
    hand = torch.zeros(64, 64)
    hand[8:56, 16:48] = 1
    cases = [Case("hand-made, a centred 32×48 rectangle, S = 4",
                  dict(mask=hand, box=[16.0, 8.0, 48.0, 56.0], canvas_hw=(64, 64), num_grid=4, sigma=0.2),
                  (1, 2, 1, 2))]
    g = _gen(14)
    for k in range(8):
        mask, box = _random_mask(g, 64, 96)
        s = (4, 8, 12, 16)[k % 4]
        cells = center_region_cells(mask, box, (64, 96), s, 0.2)
        cy, cx = cells.mass_center
        cases.append(Case(f"random case {k + 1} (an L-shaped mask on a 64×96 canvas, centre of mass at row "
                          f"{cy:.2f}, column {cx:.2f})",
                          dict(mask=mask, box=box, canvas_hw=(64, 96), num_grid=s, sigma=0.2),
                          (cells.top, cells.bottom, cells.left, cells.right)))
    return _run("check_center_region", fn, cases,
                "SOLO §3.2: the centre region is (c_x, c_y, σ·w, σ·h) with σ = 0.2 — (c_x, c_y) the mask's centre "
                "of mass (mean column and row of its pixels), w×h the box size; quantise its corners to cells "
                "(row = ⌊(y / H) / (1 / S)⌋), clamp to the grid and to the centre cell ± 1 (at most 3×3 cells).",
                verbose=verbose)


def check_matrix_nms_decay(fn: Callable, verbose: bool = True) -> CheckResult:
    """``fn(masks, labels, sigma=2.0)`` with binary ``masks`` ``N×H×W`` sorted by decreasing score and ``labels``
    ``N`` → ``N`` decay factors (mask j's score is multiplied by the j-th). Compared with the column minimum of the
    gaussian decay matrix of :func:`onestage.modeling.solo.matrix_nms_decay`."""
    one = torch.ones(1, 2, 2)
    nested = torch.zeros(3, 1, 10)
    nested[0, 0, :10] = nested[1, 0, :9] = nested[2, 0, :5] = 1
    cases = [Case("hand-made, two identical masks", dict(masks=torch.cat([one, one]), labels=torch.tensor([0, 0]),
                                                         sigma=2.0), torch.tensor([1.0, math.exp(-2.0)])),
             Case("hand-made, two identical masks of different classes",
                  dict(masks=torch.cat([one, one]), labels=torch.tensor([0, 1]), sigma=2.0), torch.tensor([1.0, 1.0]),
                  hint="SOLOv2 §3.3: masks of different classes never decay each other."),
             Case("hand-made, 1×10 masks: a 10-px mask, a 9-px duplicate inside it, a 5-px part of both",
                  dict(masks=nested, labels=torch.tensor([0, 0, 0]), sigma=2.0),
                  torch.tensor([1.0, math.exp(-2.0 * 0.81), math.exp(-0.5)]),
                  hint="SOLOv2 §3.3, the compensation: mask 1 is itself a duplicate of mask 0 (IoU 0.9), so its "
                       "IoU with mask 2 (5/9) is compensated — f(5/9)/f(comp_1 = 0.9) > 1 — and only mask 0 "
                       "decays mask 2: f(0.5) = exp(−0.5).")]
    g = _gen(15)
    for k in range(5):
        n = 5
        base = (torch.rand((1, 6, 6), generator=g) > 0.4).float()
        noise = (torch.rand((n, 6, 6), generator=g) > 0.8).float()
        masks = ((base + noise) % 2).clamp(max=1)  # near-duplicates of one mask
        masks[:, 0, 0] = 1  # never empty
        labels = torch.randint(0, 2, (n,), generator=g)
        sigma = (2.0, 2.0, 0.5, 2.0, 4.0)[k]
        _, decay = matrix_nms_decay(masks, labels, "gaussian", sigma)
        cases.append(Case(f"random case {k + 1}", dict(masks=masks, labels=labels, sigma=sigma),
                          decay.min(dim=0).values))
    return _run("check_matrix_nms_decay", fn, cases,
                "SOLOv2 §3.3: decay_j = min over i < j (same class) of f(IoU_ij) / f(comp_i), with the compensation "
                "comp_i = max over k < i of IoU_ki and f(x) = exp(−σ·x²); a mask with no higher-scored mask of its "
                "class keeps decay 1.", atol=1e-5, verbose=verbose)


#: every check, by name (the notebooks' exercise cells call these)
CHECKS = {name: globals()[name] for name in __all__ if name.startswith("check_")}
