"""Fused sigmoid focal loss: Triton forward/backward kernels against ``onestage.modeling.losses.sigmoid_focal_loss``.

The kernels run on CPU through Triton's interpreter, in one subprocess (this file executed as a script) started with
``TRITON_INTERPRET=1`` — the variable must be set before the kernels are decorated, i.e. before ``onestage.ops`` is
imported — which prints one JSON record per case for the parametrised tests below.

Error bounds (reference in float64, the kernel accumulating in fp32): loss ``|kernel − ref| / |ref|`` ≤ 1e-5 and
gradient ``max|kernel − ref| / max|ref|`` ≤ 1e-5 (measured ≤ 1e-6) for float64/float32 logits; 2e-3 / 1.6e-2 for
float16 / bfloat16 logits against the fp32 loss of the same rounded logits (the result is rounded to the input dtype).
"""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from onestage.ops.focal_loss import sigmoid_focal_loss_reference as reference
from onestage.ops import sigmoid_focal_loss
from triton_interpreter import relative_error, run_interpreted, spy_kernel_launches

FL = importlib.import_module("onestage.ops.focal_loss")

FP64_BOUND = 1e-5
LOW_PRECISION_BOUND = {"float16": 2e-3, "bfloat16": 1.6e-2}

# (name, locations, classes, alpha, gamma, logit scale, dtype, transposed storage)
CASES = [
    ("retinanet_defaults", 37, 5, 0.25, 2.0, 4.0, "float64", False),
    ("no_alpha_gamma0_many_blocks", 130, 81, -1.0, 0.0, 4.0, "float64", False),
    ("one_location_one_class", 1, 1, 0.5, 1.5, 4.0, "float64", False),
    ("no_location", 0, 80, 0.25, 2.0, 4.0, "float64", False),
    ("extreme_logits", 50, 7, 0.25, 2.0, 60.0, "float64", False),
    ("gamma_below_one", 29, 3, 0.25, 0.5, 3.0, "float64", False),
    ("non_contiguous", 45, 9, 0.25, 2.0, 4.0, "float32", True),
    ("float16", 70, 11, 0.25, 2.0, 4.0, "float16", False),
    ("bfloat16", 70, 11, 0.25, 2.0, 4.0, "bfloat16", False),
]


def _inputs(case, seed=0):
    _, num_rows, num_cols, _, _, scale, dtype, transposed = case
    g = torch.Generator().manual_seed(seed)
    if transposed:
        logits = (torch.randn(num_cols, num_rows, generator=g, dtype=torch.float64) * scale).t()
    else:
        logits = torch.randn(num_rows, num_cols, generator=g, dtype=torch.float64) * scale
    # -1 (ignored by the model, a negative here like in the reference), 0..C-1 positives, C background
    targets = torch.randint(-1, num_cols + 1, (num_rows,), generator=g)
    return logits.to(getattr(torch, dtype)), targets


def _interpreter_checks() -> dict:
    """Run in the subprocess (TRITON_INTERPRET=1): kernel vs reference per case, plus custom-op checks."""
    torch.set_num_threads(1)
    assert FL.TRITON_INTERPRET, "TRITON_INTERPRET=1 must be set before onestage.ops is imported"
    launches = spy_kernel_launches(FL)  # the op calls these module globals
    records = {}
    for case in CASES:
        logits, targets = _inputs(case)
        alpha, gamma = case[3], case[4]
        logits.requires_grad_(True)
        launches.clear()
        loss = sigmoid_focal_loss(logits, targets, alpha, gamma)
        (grad,) = torch.autograd.grad(loss, logits, torch.tensor(1.5, dtype=loss.dtype))
        x64 = logits.detach().double().requires_grad_(True)
        ref = reference(x64, targets, alpha, gamma, reduction="sum")
        (ref_grad,) = torch.autograd.grad(ref, x64, torch.tensor(1.5, dtype=torch.float64))
        records[case[0]] = dict(kernel_path=launches == ["_forward_triton", "_backward_triton"],
                                dtype=str(loss.dtype), grad_dtype=str(grad.dtype), shape=list(loss.shape),
                                loss=relative_error(loss, ref), grad=relative_error(grad, ref_grad),
                                finite=bool(torch.isfinite(grad).all()))
    logits, targets = _inputs(CASES[0])
    logits.requires_grad_(True)
    opcheck = torch.library.opcheck(torch.ops.onestage.sigmoid_focal_loss.default, (logits, targets, 0.25, 2.0))
    records["opcheck"] = {k: v == "SUCCESS" for k, v in opcheck.items()}
    compiled = torch.compile(lambda x: sigmoid_focal_loss(x, targets, 0.25, 2.0) * 2, backend="aot_eager",
                             fullgraph=True)
    out = compiled(logits)
    (g_compiled,) = torch.autograd.grad(out, logits)
    ref = reference(logits, targets, 0.25, 2.0) * 2
    (g_ref,) = torch.autograd.grad(ref, logits)
    records["compile"] = dict(loss=relative_error(out, ref), grad=relative_error(g_compiled, g_ref))
    return records


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference_under_interpreter(interpreted, case):
    r = interpreted[case[0]]
    assert r["kernel_path"]
    assert r["shape"] == [] and r["dtype"] == r["grad_dtype"] == f"torch.{case[6]}"
    assert r["finite"]
    bound = LOW_PRECISION_BOUND.get(case[6], FP64_BOUND)
    assert r["loss"] <= bound, r
    assert r["grad"] <= bound, r


def test_custom_op_checks_and_compile_under_interpreter(interpreted):
    assert interpreted["opcheck"] and all(interpreted["opcheck"].values()), interpreted["opcheck"]
    assert interpreted["compile"]["loss"] <= FP64_BOUND
    assert interpreted["compile"]["grad"] <= FP64_BOUND


# --- dispatch and the op's CPU fallback (no Triton involved) ---

def test_cpu_tensors_take_the_reference_path(monkeypatch):
    if FL.TRITON_INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors go to the interpreted kernel")
    monkeypatch.setattr(FL, "_focal_op", lambda *a: pytest.fail("the custom op ran on CPU tensors"))
    logits, targets = _inputs(CASES[0])
    assert not FL.triton_supported(logits)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), reference(logits, targets, 0.25, 2.0))


def test_force_reference_switches(monkeypatch):
    monkeypatch.setattr(FL, "triton_supported", lambda t: True)  # pretend a kernel could run
    called = []
    monkeypatch.setattr(FL, "_focal_op", lambda *a: called.append(a) or "kernel")
    logits, targets = _inputs(CASES[0])
    assert sigmoid_focal_loss(logits, targets) == "kernel"
    assert called[0][2:] == (0.25, 2.0)
    expected = reference(logits, targets, 0.25, 2.0)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, force_reference=True), expected)
    monkeypatch.setenv("ONESTAGE_FORCE_REFERENCE", "1")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), expected)
    assert len(called) == 1


def test_shape_errors():
    with pytest.raises(ValueError, match="L×C"):
        sigmoid_focal_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        sigmoid_focal_loss(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_cpu_fallback_of_the_custom_op_matches_reference():
    # hand-checkable: one location, classes (0, 1), target 1; p = σ(x)
    logits = torch.tensor([[0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1])
    out = torch.ops.onestage.sigmoid_focal_loss(logits, targets, 0.25, 2.0)
    p = torch.sigmoid(logits.detach())
    expected = 0.75 * p[0, 0] ** 2 * -torch.log(1 - p[0, 0]) + 0.25 * (1 - p[0, 1]) ** 2 * -torch.log(p[0, 1])
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out, logits)
    # closed forms of the module docstring
    sp = torch.nn.functional.softplus
    x = logits.detach()[0]
    d_neg = 0.75 * p[0, 0] ** 2 * (2 * (1 - p[0, 0]) * sp(x[0]) + p[0, 0])
    d_pos = -0.25 * (1 - p[0, 1]) ** 2 * (2 * p[0, 1] * sp(-x[1]) + (1 - p[0, 1]))
    torch.testing.assert_close(grad, torch.stack([d_neg, d_pos])[None])
    torch.testing.assert_close(grad, torch.autograd.grad(reference(logits, targets), logits)[0])


# --- real GPU, realistic shapes (skipped without CUDA) ---

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference_on_gpu_coco_scale(dtype):
    # FCOS at 800×1333: 22,300 locations over P3–P7 × 80 classes, batch 2; ~1% positives
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(2 * 22300, 80, device="cuda", generator=g) * 3 - 4).to(dtype).requires_grad_(True)
    targets = torch.full((logits.shape[0],), 80, device="cuda")
    pos = torch.randint(0, logits.shape[0], (400,), device="cuda", generator=g)
    targets[pos] = torch.randint(0, 80, (400,), device="cuda", generator=g)
    loss = sigmoid_focal_loss(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    x32 = logits.detach().float().requires_grad_(True)
    ref = reference(x32, targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, x32)
    bound = 1e-4 if dtype == torch.float32 else LOW_PRECISION_BOUND[str(dtype).split(".")[-1]]
    assert relative_error(loss, ref) <= bound
    assert relative_error(grad, ref_grad) <= bound


if __name__ == "__main__":  # the interpreter subprocess of the `interpreted` fixture
    print(json.dumps(_interpreter_checks()))
