"""BlendMask's fused blender: Triton forward/backward kernels against ``blend_reference`` (bilinear + softmax), the
dispatch of :func:`onestage.ops.blender.blend`, the bilinear interpolation matrices of the backward, and the CUDA
kernels at the realistic shape (100 RoIs, K = 4, R = 56, M = 14; skipped without a GPU).

The kernels run on CPU through Triton's interpreter, in one subprocess (this file executed as a script) started with
``TRITON_INTERPRET=1`` — the variable must be set before the kernels are decorated, i.e. before ``onestage.ops`` is
imported — which prints one JSON record per case for the parametrised tests below.

Error bounds (``max|kernel − reference| / max|reference|``, reference in float64 on the same rounded inputs, the kernel
computing in fp32): 1e-5 for float64/float32 inputs (measured ≤ 1.3e-6, the largest on the downsampling case);
2e-3 for float16 and 1.6e-2 for bfloat16 inputs (the outputs and gradients are rounded to the input dtype: 2^-11 and
2^-8 relative, the rest is fp32 rounding).
"""
from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from onestage.ops.blender import bilinear_matrix, blend, blend_reference
from triton_interpreter import compiled_resource_usage, relative_error, run_interpreted, spy_kernel_launches

BL = importlib.import_module("onestage.ops.blender")

FP64_BOUND = 1e-5
LOW_PRECISION_BOUND = {"float16": 2e-3, "bfloat16": 1.6e-2}

# (name, RoIs N, bases K, crop R (int or (h, w)), attention M (int or (h, w)), dtype, non-contiguous crops)
CASES = [
    ("k4_odd_sizes", 2, 4, 7, 3, "float64", False),
    ("k1_one_basis", 1, 1, 5, 5, "float64", False),
    ("k2_upsample", 3, 2, 9, 4, "float64", False),
    ("one_roi_k4", 1, 4, 11, 5, "float32", False),
    ("no_roi", 0, 4, 5, 3, "float32", False),
    ("downsample_m_above_r", 2, 3, 6, 11, "float64", False),
    ("yolact_m1", 2, 4, 7, 1, "float64", False),
    ("rectangular", 2, 3, (6, 9), (4, 3), "float64", False),
    ("k8_several_pixel_blocks", 1, 8, 23, 7, "float32", False),
    ("non_contiguous", 2, 4, 9, 3, "float32", True),
    ("float16", 2, 4, 9, 5, "float16", False),
    ("bfloat16", 2, 2, 9, 5, "bfloat16", False),
]


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _inputs(case, seed=0):
    _, n, k, r, m, dtype, transposed = case
    (r_h, r_w), (m_h, m_w) = _pair(r), _pair(m)
    g = torch.Generator().manual_seed(seed)
    if transposed:  # crops stored W-major: a transposed view
        bases = torch.randn(n, k, r_w, r_h, generator=g, dtype=torch.float64).transpose(2, 3)
    else:
        bases = torch.randn(n, k, r_h, r_w, generator=g, dtype=torch.float64)
    attns = 3.0 * torch.randn(n, k, m_h, m_w, generator=g, dtype=torch.float64)  # peaked softmax weights
    dtype = getattr(torch, dtype)
    return bases.to(dtype), attns.to(dtype)


def _interpreter_checks() -> dict:
    """Run in the subprocess (TRITON_INTERPRET=1): kernel vs reference for every case, plus custom-op checks."""
    torch.set_num_threads(1)
    assert BL.TRITON_INTERPRET, "TRITON_INTERPRET=1 must be set before onestage.ops is imported"
    launches = spy_kernel_launches(BL)  # the op calls these module globals
    records = {}
    for case in CASES:
        bases, attns = _inputs(case)
        bases.requires_grad_(True)
        attns.requires_grad_(True)
        launches.clear()
        out = blend(bases, attns)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        gb, ga = torch.autograd.grad(out, (bases, attns), grad_out.to(out.dtype))
        kernel_path = launches == ["_forward_triton", "_backward_triton"]
        b64, a64 = bases.detach().double().requires_grad_(True), attns.detach().double().requires_grad_(True)
        ref = blend_reference(b64, a64)
        rb, ra = torch.autograd.grad(ref, (b64, a64), grad_out, allow_unused=True)  # N = 0: no graph to b64
        records[case[0]] = dict(
            kernel_path=bool(kernel_path), dtype=str(out.dtype), shape=list(out.shape),
            grad_dtypes=[str(gb.dtype), str(ga.dtype)], grad_shapes=[list(gb.shape), list(ga.shape)],
            forward=relative_error(out, ref), grad_bases=relative_error(gb, rb), grad_attns=relative_error(ga, ra),
            grad_attns_max=float(ga.detach().abs().max()) if ga.numel() else 0.0)

    # hand-computed: K = 2, M = 1, R = 1; weights softmax([0, log 3]) = (1/4, 3/4); crops (2, −1) → −1/4
    rois = torch.tensor([[[[2.0]], [[-1.0]]]])
    attn = torch.tensor([[[[0.0]], [[float(torch.log(torch.tensor(3.0)))]]]])
    records["hand_two_bases"] = float(blend(rois, attn))

    # the custom op: schema, fake tensor, autograd registration, AOT dispatch (opcheck), and torch.compile
    bases, attns = _inputs(CASES[0])
    bases.requires_grad_(True)
    attns.requires_grad_(True)
    opcheck = torch.library.opcheck(torch.ops.onestage.blend.default, (bases, attns))
    records["opcheck"] = {k: v == "SUCCESS" for k, v in opcheck.items()}
    compiled = torch.compile(lambda b, a: blend(b, a) * 2, backend="aot_eager", fullgraph=True)
    out = compiled(bases, attns)
    g_compiled = torch.autograd.grad(out.square().sum(), (bases, attns))
    ref = blend_reference(bases, attns) * 2
    g_ref = torch.autograd.grad(ref.square().sum(), (bases, attns))
    records["compile"] = dict(forward=relative_error(out, ref),
                              grads=max(relative_error(a, b) for a, b in zip(g_compiled, g_ref)))
    return records


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference_under_interpreter(interpreted, case):
    r = interpreted[case[0]]
    _, n, k, size, m, dtype, _ = case
    assert r["kernel_path"]
    assert r["shape"] == [n, *_pair(size)]
    assert r["dtype"] == f"torch.{dtype}" and r["grad_dtypes"] == [f"torch.{dtype}"] * 2
    assert r["grad_shapes"] == [[n, k, *_pair(size)], [n, k, *_pair(m)]]
    bound = LOW_PRECISION_BOUND.get(dtype, FP64_BOUND)
    assert r["forward"] <= bound, r
    assert r["grad_bases"] <= bound, r
    assert r["grad_attns"] <= bound, r


def test_one_basis_gets_no_attention_gradient_under_interpreter(interpreted):
    # a softmax over one basis is the constant 1: the attention cannot matter
    assert interpreted["k1_one_basis"]["grad_attns_max"] == 0.0


def test_hand_computed_case_under_interpreter(interpreted):
    assert interpreted["hand_two_bases"] == pytest.approx(2.0 / 4 - 3.0 / 4, abs=1e-6)


def test_custom_op_checks_and_compile_under_interpreter(interpreted):
    assert interpreted["opcheck"] and all(interpreted["opcheck"].values()), interpreted["opcheck"]
    assert interpreted["compile"]["forward"] <= FP64_BOUND
    assert interpreted["compile"]["grads"] <= FP64_BOUND


# --- the interpolation matrices of the backward (plain PyTorch) ---

@pytest.mark.parametrize("m, r", [(14, 56), (3, 7), (5, 5), (11, 6), (1, 4), (4, 1)])
def test_bilinear_matrices_reproduce_f_interpolate_and_its_adjoint(m, r):
    # fp32 like the kernels (the weights are fp32: compared with float64 they differ by fp32 rounding)
    g = torch.Generator().manual_seed(m * 100 + r)
    a = torch.randn(3, 2, m, m + 1, generator=g, requires_grad=True)
    w_y, w_x = bilinear_matrix(m, r), bilinear_matrix(m + 1, r + 2)
    up = F.interpolate(a, size=(r, r + 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(w_y @ a @ w_x.t(), up)
    # every row is a convex combination of at most two source cells
    torch.testing.assert_close(w_y.sum(1), torch.ones(r))
    assert int((w_y > 0).sum(1).max()) <= 2
    grad_up = torch.randn(up.shape, generator=g)
    (expected,) = torch.autograd.grad(up, a, grad_up)
    torch.testing.assert_close(w_y.t() @ grad_up @ w_x, expected)


def test_bilinear_matrix_by_hand():
    # M = 2 → R = 4, align_corners=False: src = (dst + ½)/2 − ½ = −¼ (→ 0), ¼, ¾, 5/4 (upper index clamped)
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    torch.testing.assert_close(bilinear_matrix(2, 4), expected)


# --- dispatch and the op's CPU fallback (no Triton involved) ---

def _small():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 3, 3, generator=g)


def test_cpu_tensors_take_the_reference_path(monkeypatch):
    if BL.TRITON_INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors go to the interpreted kernel")
    monkeypatch.setattr(BL, "_blend_op", lambda *a: pytest.fail("the custom op ran on CPU tensors"))
    bases, attns = _small()
    assert not BL.triton_supported(bases)
    torch.testing.assert_close(blend(bases, attns), blend_reference(bases, attns), rtol=0, atol=0)


def test_only_bilinear_softmax_goes_to_the_kernel(monkeypatch):
    monkeypatch.setattr(BL, "triton_supported", lambda t: True)  # pretend a kernel could run
    called = []
    monkeypatch.setattr(BL, "_blend_op", lambda *a: called.append(a) or "kernel")
    bases, attns = _small()
    assert blend(bases, attns) == "kernel" and blend(bases, attns, "bilinear", "softmax") == "kernel"
    assert len(called) == 2
    for interpolation, normalize in [("nearest", "softmax"), ("bilinear", "none"), ("nearest", "none")]:
        torch.testing.assert_close(blend(bases, attns, interpolation, normalize),
                                   blend_reference(bases, attns, interpolation, normalize))
    one = (bases[:, :1], attns[:, :1])
    torch.testing.assert_close(blend(*one, "bilinear", "sigmoid"), blend_reference(*one, "bilinear", "sigmoid"))
    many = torch.zeros(1, BL.MAX_KERNEL_BASES + 1, 4, 4), torch.zeros(1, BL.MAX_KERNEL_BASES + 1, 2, 2)
    torch.testing.assert_close(blend(*many), blend_reference(*many))
    expected = blend_reference(bases, attns)
    torch.testing.assert_close(blend(bases, attns, force_reference=True), expected)
    monkeypatch.setenv("ONESTAGE_FORCE_REFERENCE", "1")
    torch.testing.assert_close(blend(bases, attns), expected)
    assert len(called) == 2


def test_argument_errors_before_dispatch():
    bases, attns = _small()
    with pytest.raises(ValueError, match="interpolation"):
        blend(bases, attns, "bicubic")
    with pytest.raises(ValueError, match="disagree"):
        blend(bases, attns[:, :3])


def test_cpu_fallback_of_the_custom_op_matches_reference():
    bases, attns = _small()
    bases.requires_grad_(True)
    attns.requires_grad_(True)
    out = torch.ops.onestage.blend(bases, attns)
    ref = blend_reference(bases, attns)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn(out.shape)
    got = torch.autograd.grad(out, (bases, attns), grad_out)
    expected = torch.autograd.grad(ref, (bases, attns), grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# --- the kernels compile offline for a real GPU (sm_90, Triton's bundled ptxas) without spilling registers ---

@pytest.mark.parametrize("num_bases", [4, 32])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_kernels_compile_for_sm90_without_spills(num_bases, dtype, tmp_path):
    if not BL.HAS_TRITON or BL.TRITON_INTERPRET:
        pytest.skip("needs Triton, not its interpreter")
    k_pad, block = BL._launch_config(num_bases)
    types = dict(bases_ptr=f"*{dtype}", attns_ptr=f"*{dtype}", out_ptr=f"*{dtype}", grad_out_ptr=f"*{dtype}",
                 grad_bases_ptr=f"*{dtype}", grad_up_ptr="*fp32", first_roi="i32", num_bases="i32", RH="i32",
                 RW="i32", MH="i32", MW="i32", scale_h="fp32", scale_w="fp32")
    for kernel in (BL._blend_fwd_kernel, BL._blend_bwd_kernel):
        registers, stack = compiled_resource_usage(kernel, types, dict(K_P=k_pad, BLOCK=block), BL.NUM_WARPS,
                                                   tmp_path)
        assert stack == 0 and registers < 255, (kernel.__name__, registers, stack)


# --- real GPU, realistic shape (skipped without CUDA) ---

def _realistic(dtype, device="cuda", num_rois=100, num_bases=4, resolution=56, attn_size=14):
    g = torch.Generator(device=device).manual_seed(0)
    bases = torch.randn(num_rois, num_bases, resolution, resolution, device=device, generator=g)
    attns = 3 * torch.randn(num_rois, num_bases, attn_size, attn_size, device=device, generator=g)
    return bases.to(dtype), attns.to(dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference_on_gpu_realistic_shape(dtype):
    # BlendMask defaults: 100 RoIs, K = 4 bases, R = 56 (bottom resolution), M = 14 (attention size)
    bases, attns = _realistic(dtype)
    bases.requires_grad_(True)
    attns.requires_grad_(True)
    out = blend(bases, attns)
    grad_out = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    gb, ga = torch.autograd.grad(out, (bases, attns), grad_out.to(dtype))
    b32, a32 = bases.detach().float().requires_grad_(True), attns.detach().float().requires_grad_(True)
    ref = blend_reference(b32, a32)
    rb, ra = torch.autograd.grad(ref, (b32, a32), grad_out)
    bound = 1e-5 if dtype == torch.float32 else LOW_PRECISION_BOUND[str(dtype).split(".")[-1]]
    assert out.dtype == gb.dtype == ga.dtype == dtype
    assert relative_error(out, ref) <= bound
    assert relative_error(gb, rb) <= bound
    assert relative_error(ga, ra) <= bound


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_backward_is_deterministic_and_opcheck_passes():
    bases, attns = _realistic(torch.float32, num_rois=7)
    bases.requires_grad_(True)
    attns.requires_grad_(True)
    grad_out = torch.randn(7, 56, 56, device="cuda")
    first = torch.autograd.grad(blend(bases, attns), (bases, attns), grad_out)
    second = torch.autograd.grad(blend(bases, attns), (bases, attns), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    result = torch.library.opcheck(torch.ops.onestage.blend.default, (bases, attns))
    assert all(v == "SUCCESS" for v in result.values()), result


if __name__ == "__main__":  # the interpreter subprocess of the `interpreted` fixture
    print(json.dumps(_interpreter_checks()))
