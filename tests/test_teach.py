"""onestage.teach: every check passes its reference solution, fails a typical mistake with a precise message, and
every exercise cell of notebooks 01–05 calls an existing check."""
import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import onestage.teach as teach
from onestage.teach import solutions as S

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WALKTHROUGHS = ["01_fcos_fpn_assignment.ipynb", "02_centerness.ipynb", "03_blendmask_blender.ipynb",
                "04_condinst_dynamic_heads.ipynb", "05_solo_grids.ipynb"]

SOLUTIONS = {
    "check_locations": S.locations, "check_ltrb_targets": S.ltrb_targets, "check_fpn_levels": S.fpn_levels,
    "check_center_sampling": S.center_sampling, "check_centerness_target": S.centerness_target,
    "check_spearman": S.spearman, "check_final_score": S.final_score, "check_blend": S.blend,
    "check_yolact_blend": S.yolact_blend, "check_fcis_attention": S.fcis_attention,
    "check_num_dynamic_params": S.num_dynamic_params, "check_parse_dynamic_params": S.parse_dynamic_params,
    "check_relative_coordinates": S.relative_coordinates, "check_dynamic_head": S.dynamic_head,
    "check_assign_levels": S.assign_levels, "check_center_region": S.center_region,
    "check_matrix_nms_decay": S.matrix_nms_decay,
}


# --- typical mistakes, one per check -----------------------------------------------------------------------------

def locations_without_half_stride(height, width, stride):
    xs = torch.arange(width, dtype=torch.float32) * stride
    ys = torch.arange(height, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)


def ltrb_in_xyxy_order(locations, boxes):  # (l, r, t, b) instead of (l, t, r, b)
    return S.ltrb_targets(locations, boxes)[..., [0, 2, 1, 3]]


def fpn_levels_exclusive(max_reg, sizes_of_interest=(64, 128, 256, 512)):  # m_{i-1} < max ≤ m_i: off by one level
    bounds = [0.0, *[float(s) for s in sizes_of_interest], math.inf]
    return (max_reg[:, None] > torch.tensor(bounds[:-1])) & (max_reg[:, None] <= torch.tensor(bounds[1:]))


def center_sampling_unclipped(locations, boxes, strides, radius=1.5):
    r = (strides * radius)[:, None]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    x, y = locations[:, 0, None], locations[:, 1, None]
    return ((x - cx).abs() < r) & ((y - cy).abs() < r)


def centerness_without_sqrt(ltrb):
    return S.centerness_target(ltrb) ** 2


def spearman_ordinal_ranks(a, b):  # ranks by argsort: ties broken by position instead of averaged
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / torch.sqrt((ra ** 2).sum() * (rb ** 2).sum()))


def final_score_product(cls, ctr):
    return cls * ctr


def blend_softmax_first(bases_rois, attns):
    a = F.interpolate(attns.softmax(dim=1), size=bases_rois.shape[-2:], mode="bilinear", align_corners=False)
    return (a * bases_rois).sum(dim=1)


def yolact_sigmoid(bases_rois, coeffs):
    return (coeffs.sigmoid()[:, :, None, None] * bases_rois).sum(dim=1)


def fcis_transposed(grid):
    return S.fcis_attention(grid).transpose(1, 2)


def num_params_without_biases(mask_channels=8, channels=8, num_layers=3, rel_coords=True):
    dims = [mask_channels + (2 if rel_coords else 0)] + [channels] * (num_layers - 1) + [1]
    return sum(o * i for i, o in zip(dims[:-1], dims[1:]))


def parse_interleaved(params, in_channels, channels, num_layers):  # W0, b0, W1, b1, ...
    dims = [in_channels] + [channels] * (num_layers - 1) + [1]
    n, start, weights, biases = params.shape[0], 0, [], []
    for c_in, c_out in zip(dims[:-1], dims[1:]):
        weights.append(params[:, start:start + c_out * c_in].reshape(n, c_out, c_in))
        start += c_out * c_in
        biases.append(params[:, start:start + c_out])
        start += c_out
    return weights, biases


def relative_coordinates_unnormalised(location, size_of_interest, height, width, stride):
    return S.relative_coordinates(location, size_of_interest, height, width, stride) * size_of_interest


def dynamic_head_relu_last(head_input, weights, biases):
    return torch.relu(S.dynamic_head(head_input, weights, biases))


def assign_levels_longer_side(boxes, scale_ranges):
    scale = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    lo = torch.tensor([float(r[0]) for r in scale_ranges])
    hi = torch.tensor([float(r[1]) for r in scale_ranges])
    return (scale[:, None] >= lo) & (scale[:, None] <= hi)


def center_region_sigma_half(mask, box, canvas_hw, num_grid, sigma=0.2):  # the wrong σ
    return S.center_region(mask, box, canvas_hw, num_grid, sigma=0.5)


def decay_without_compensation(masks, labels, sigma=2.0):  # f(IoU) alone
    n = masks.shape[0]
    flat = masks.reshape(n, -1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    upper = torch.ones(n, n).triu(diagonal=1).bool() & (labels[:, None] == labels[None, :])
    return torch.exp(-sigma * torch.where(upper, iou, torch.zeros_like(iou)) ** 2).min(dim=0).values


# (check, wrong function, texts the report must contain: the failing input and the hint's paper section)
MISTAKES = [
    ("check_locations", locations_without_half_stride, ["hand-made, 2×2 map at stride 8", "FCOS §3.1", "⌊s/2⌋"]),
    ("check_ltrb_targets", ltrb_in_xyxy_order, ["hand-made, one location, one box", "FCOS §3.1 eq. 1"]),
    ("check_fpn_levels", fpn_levels_exclusive, ["max_reg = 64", "FCOS §3.2", "inclusive"]),
    ("check_center_sampling", center_sampling_unclipped, ["outside a small box", "clipped to the box"]),
    ("check_centerness_target", centerness_without_sqrt, ["off-centre horizontally", "FCOS §3.3 eq. 3",
                                                         "square root"]),
    ("check_spearman", spearman_ordinal_ranks, ["a tie", "average of the ranks"]),
    ("check_final_score", final_score_product, ["hand-made", "FCOS §3.3", "sqrt(cls · ctr)"]),
    ("check_blend", blend_softmax_first, ["random case 1", "BlendMask §3.2 eqs. 2–4", "softmax before"]),
    ("check_yolact_blend", yolact_sigmoid, ["hand-made", "BlendMask §4.1", "softmax"]),
    ("check_fcis_attention", fcis_transposed, ["hand-made, 2×2 grid", "BlendMask §4.1", "k = i·g + j"]),
    ("check_num_dynamic_params", num_params_without_biases, ["the defaults", "CondInst §3.2", "169"]),
    ("check_parse_dynamic_params", parse_interleaved, ["hand-made, 2 → 2 → 1", "CondInst §2.2",
                                                       "all the weights first"]),
    ("check_relative_coordinates", relative_coordinates_unnormalised, ["hand-made", "CondInst §2.2",
                                                                       "size_of_interest"]),
    ("check_dynamic_head", dynamic_head_relu_last, ["random case", "CondInst §2", "none after the last"]),
    ("check_assign_levels", assign_levels_longer_side, ["thin 50×200 box", "SOLO §3.2", "sqrt(w·h)"]),
    ("check_center_region", center_region_sigma_half, ["random case", "SOLO §3.2", "σ = 0.2"]),
    ("check_matrix_nms_decay", decay_without_compensation, ["a 9-px duplicate inside it", "SOLOv2 §3.3",
                                                            "the compensation"]),
]


def test_every_check_has_a_solution_and_a_mistake():
    assert set(SOLUTIONS) == set(teach.CHECKS) == {name for name, _, _ in MISTAKES}


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_solution_passes(name, capsys):
    result = teach.CHECKS[name](SOLUTIONS[name])
    assert result.passed and result.cases >= 3, str(result)
    assert capsys.readouterr().out.strip() == f"{name}: passed: {result.cases} cases"


@pytest.mark.parametrize("name, wrong, texts", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_fails_with_a_precise_message(name, wrong, texts, capsys):
    result = teach.CHECKS[name](wrong)
    assert not result.passed
    message = str(result)
    assert capsys.readouterr().out.strip() == message
    assert f"{name}: FAILED on case {result.cases}" in message
    assert wrong.__name__ in result.inputs  # the call, with its inputs
    for line in ("input:", "expected:", "got:", "hint:"):
        assert line in message
    assert result.expected != result.got
    assert result.case_inputs is not None and wrong(**result.case_inputs) is not None  # can be rerun
    for text in texts:
        assert text in message, (text, message)


def test_report_names_the_first_differing_element():
    result = teach.check_centerness_target(centerness_without_sqrt, verbose=False)
    assert result.cases == 2
    assert result.expected.startswith("0.57735") and "at index [0]" in result.expected
    assert result.got.startswith("0.3333") and "at index [0]" in result.got


def test_an_exception_or_a_stub_is_reported():
    def stub(ltrb):
        raise NotImplementedError

    def broken(ltrb):
        return ltrb.nope

    assert "NotImplementedError" in teach.check_centerness_target(stub, verbose=False).got
    assert "raised AttributeError" in teach.check_centerness_target(broken, verbose=False).got
    wrong_shape = teach.check_centerness_target(lambda ltrb: ltrb, verbose=False)
    assert "shape (1,)" in wrong_shape.expected and "shape (1, 4)" in wrong_shape.got


def test_random_cases_are_not_trivial():
    """The random cases exercise both outcomes (else a constant answer could pass)."""
    cases = []
    real_run = teach._run
    try:
        teach._run = lambda name, fn, cs, hint, **kw: cases.extend(cs)
        teach.check_center_sampling(None)
        teach.check_fpn_levels(None)
        teach.check_matrix_nms_decay(None)
        teach.check_final_score(None)
    finally:
        teach._run = real_run
    masks = [c.expected for c in cases if c.label.startswith("random") and c.expected.dtype == torch.bool]
    assert any(m.any() for m in masks) and all(not m.all() for m in masks)
    decays = torch.cat([c.expected for c in cases if "masks" in c.inputs])
    assert (decays < 0.99).any() and (decays == 1).any()
    assert all(len(c.expected) > 10 for c in cases if "postprocess" in c.label)


# --- the notebooks ------------------------------------------------------------------------------------------------

def exercise_cells(path):
    nb = json.loads(path.read_text())
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith("# Exercise")]


@pytest.mark.parametrize("notebook", WALKTHROUGHS)
def test_every_exercise_cell_calls_an_existing_check(notebook):
    cells = exercise_cells(NOTEBOOKS / notebook)
    assert 3 <= len(cells) <= 5
    for cell in cells:
        assert cell["outputs"] == [] and cell["execution_count"] is None
        tree = ast.parse("".join(cell["source"]))
        called = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        checks = [name for name in called if name.startswith("check_")]
        assert len(checks) == 1 and checks[0] in teach.CHECKS, checks
        defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert len(defined) == 1 and "# YOUR CODE HERE" in "".join(cell["source"])


def test_each_check_is_an_exercise_once():
    used = []
    for notebook in WALKTHROUGHS:
        for cell in exercise_cells(NOTEBOOKS / notebook):
            used += [n for n in teach.CHECKS if f"{n}(" in "".join(cell["source"])]
    assert sorted(used) == sorted(teach.CHECKS)
