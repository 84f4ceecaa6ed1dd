"""CondInst dynamic mask head: parameter layout and hand-computed values of the reference, dispatch, and the fused
Triton kernels against the reference (forward and gradients).

The kernels run on CPU through Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before Triton compiles
(decorates) the kernels, i.e. before ``onestage.ops`` is imported, so the comparisons run in one subprocess (this file
executed as a script) that prints one JSON record per case; the parametrised tests below check those records.

Error bounds (``max|kernel − reference| / max|reference|``, reference in float64, the kernel accumulating in fp32):
1e-5 for float64/float32 inputs (measured ≈ 2e-7), 2e-3 for float16 and 1.6e-2 for bfloat16 inputs against an
fp32 reference (the output is rounded to the input dtype: 2^-11 and 2^-8 relative).
"""
from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from onestage.ops import dynamic_mask_head, dynamic_mask_head_reference, num_dynamic_params
from triton_interpreter import relative_error, run_interpreted, spy_kernel_launches

DMH = importlib.import_module("onestage.ops.dynamic_mask_head")

FP64_BOUND = 1e-5
LOW_PRECISION_BOUND = {"float16": 2e-3, "bfloat16": 1.6e-2}

# (name, images, mask channels, H, W, instances, channels, layers, coords, stride, dtype)
CASES = [
    ("default_rel", 2, 8, 5, 7, 5, 8, 3, "rel", 8, "float64"),
    ("one_instance_one_row_none", 1, 3, 1, 9, 1, 5, 1, "none", 4, "float64"),
    ("no_instance", 2, 8, 5, 7, 0, 8, 3, "rel", 8, "float64"),
    ("abs_deep_wide_empty_image", 3, 16, 6, 5, 7, 16, 4, "abs", 8, "float64"),
    ("coords_only_width1", 2, 4, 3, 3, 4, 1, 3, "coords_only", 8, "float64"),
    ("several_pixel_blocks", 2, 5, 13, 21, 4, 6, 2, "rel", 16, "float64"),
    ("float32", 2, 8, 7, 3, 3, 8, 3, "rel", 8, "float32"),
    ("float16", 2, 8, 5, 7, 5, 8, 3, "rel", 8, "float16"),
    ("bfloat16", 2, 8, 5, 7, 5, 8, 3, "none", 8, "bfloat16"),
]


def _inputs(case, seed=0):
    _, images, cmask, height, width, n, channels, layers, coords, stride, dtype = case
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype)
    feats = torch.randn(images, cmask, height, width, generator=g, dtype=torch.float64)
    params = torch.randn(n, num_dynamic_params(cmask, channels, layers, coords), generator=g, dtype=torch.float64)
    params = params * 0.5
    if images == 3 and n:  # leave image 1 without instances
        im_inds = torch.tensor([0, 2] * n)[:n]
    else:
        im_inds = torch.randint(0, images, (n,), generator=g)
    locations = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([width * stride, height * stride])
    sois = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0], dtype=torch.float64)
    sizes_of_interest = sois[torch.randint(0, 5, (n,), generator=g)]
    return (feats.to(dtype), params.to(dtype), im_inds, locations.float(), sizes_of_interest.float(),
            dict(mask_feat_stride=stride, channels=channels, num_layers=layers, coords=coords))


def _interpreter_checks() -> dict:
    """Run in the subprocess (TRITON_INTERPRET=1): kernel vs reference for every case, plus custom-op checks."""
    torch.set_num_threads(1)
    assert DMH.TRITON_INTERPRET, "TRITON_INTERPRET=1 must be set before onestage.ops is imported"
    launches = spy_kernel_launches(DMH)  # the op calls these module globals
    records = {}
    for case in CASES:
        feats, params, im_inds, locations, soi, head = _inputs(case)
        feats.requires_grad_(True)
        params.requires_grad_(True)
        launches.clear()
        out = dynamic_mask_head(feats, params, im_inds, locations, soi, **head)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        gf, gp = torch.autograd.grad(out, (feats, params), grad_out.to(out.dtype), allow_unused=True)
        kernel_path = launches == ["_forward_triton", "_backward_triton"]
        # oracle: the reference in float64 on the same (rounded) inputs
        f64, p64 = feats.detach().double().requires_grad_(True), params.detach().double().requires_grad_(True)
        ref = dynamic_mask_head_reference(f64, p64, im_inds, locations.double(), soi.double(), **head)
        rf, rp = torch.autograd.grad(ref, (f64, p64), grad_out, allow_unused=True)
        if rf is None:
            rf = torch.zeros_like(f64)
        records[case[0]] = dict(
            dtype=str(out.dtype), shape=list(out.shape), kernel_path=bool(kernel_path),
            grad_dtypes=[str(gf.dtype), str(gp.dtype)],
            forward=relative_error(out, ref), grad_feats=relative_error(gf, rf), grad_params=relative_error(gp, rp))

    # the custom op: schema, fake tensor, autograd registration, AOT dispatch (opcheck), and torch.compile
    feats, params, im_inds, locations, soi, head = _inputs(CASES[-3])
    feats.requires_grad_(True)
    params.requires_grad_(True)
    args = (feats, params, im_inds, locations, soi, head["mask_feat_stride"], head["channels"], head["num_layers"],
            head["coords"])
    opcheck = torch.library.opcheck(torch.ops.onestage.dynamic_mask_head.default, args)
    records["opcheck"] = {k: v == "SUCCESS" for k, v in opcheck.items()}
    compiled = torch.compile(lambda f, p: dynamic_mask_head(f, p, im_inds, locations, soi, **head),
                             backend="aot_eager", fullgraph=True)
    out = compiled(feats, params)
    (g_compiled,) = torch.autograd.grad(out.square().sum(), params)
    ref = dynamic_mask_head_reference(feats, params, im_inds, locations, soi, **head)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), params)
    records["compile"] = dict(forward=relative_error(out, ref), grad_params=relative_error(g_compiled, g_ref))
    return records


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference_under_interpreter(interpreted, case):
    r = interpreted[case[0]]
    assert r["kernel_path"]
    assert r["shape"] == [case[5], case[3], case[4]]
    assert r["dtype"] == f"torch.{case[10]}"
    assert r["grad_dtypes"] == [f"torch.{case[10]}"] * 2
    bound = LOW_PRECISION_BOUND.get(case[10], FP64_BOUND)
    assert r["forward"] <= bound, r
    assert r["grad_feats"] <= bound, r
    assert r["grad_params"] <= bound, r


def test_custom_op_checks_and_compile_under_interpreter(interpreted):
    assert interpreted["opcheck"] and all(interpreted["opcheck"].values()), interpreted["opcheck"]
    assert interpreted["compile"]["forward"] <= FP64_BOUND
    assert interpreted["compile"]["grad_params"] <= FP64_BOUND


# --- the reference: parameter count, layout, hand-computed values (no Triton involved) ---

def test_num_dynamic_params():
    assert num_dynamic_params(8, 8, 3) == 169            # CondInst §3.2: (8+2)·8+8 + 8·8+8 + 8·1+1
    assert num_dynamic_params(8, 8, 3, "none") == 153    # 8·8+8 + 8·8+8 + 8+1
    assert num_dynamic_params(8, 8, 3, "abs") == 169
    assert num_dynamic_params(8, 8, 3, "coords_only") == 2 * 8 + 8 + 8 * 8 + 8 + 8 + 1
    assert num_dynamic_params(8, 8, 1) == 10 + 1
    assert num_dynamic_params(8, 16, 2) == 10 * 16 + 16 + 16 + 1


def _loop_of_plain_convs(feats, params, im_inds, locations, soi, stride, channels, num_layers):
    """Instance by instance, layer by layer, with the layout written out: [W0, …, W_{L-1}, b0, …, b_{L-1}]."""
    _, cmask, height, width = feats.shape
    dims = [cmask + 2] + [channels] * (num_layers - 1) + [1]
    outs = []
    for n in range(params.shape[0]):
        flat, offset = params[n], 0
        weights, biases = [], []
        for c_in, c_out in zip(dims[:-1], dims[1:]):
            weights.append(flat[offset:offset + c_out * c_in].reshape(c_out, c_in, 1, 1))
            offset += c_out * c_in
        for c_out in dims[1:]:
            biases.append(flat[offset:offset + c_out])
            offset += c_out
        assert offset == flat.numel()
        ys = torch.arange(height, dtype=feats.dtype) * stride + stride // 2
        xs = torch.arange(width, dtype=feats.dtype) * stride + stride // 2
        rel_x = (locations[n, 0] - xs[None, :].expand(height, width)) / soi[n]
        rel_y = (locations[n, 1] - ys[:, None].expand(height, width)) / soi[n]
        x = torch.cat([rel_x[None], rel_y[None], feats[im_inds[n]]])[None]
        for layer, (w, b) in enumerate(zip(weights, biases)):
            x = F.conv2d(x, w, b)
            if layer < num_layers - 1:
                x = F.relu(x)
        outs.append(x[0, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("num_layers,channels", [(3, 8), (1, 8), (2, 5), (4, 3)])
def test_reference_equals_loop_of_plain_convs(num_layers, channels):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 8, 6, 9, generator=g, dtype=torch.float64)
    n = 5
    params = torch.randn(n, num_dynamic_params(8, channels, num_layers), generator=g, dtype=torch.float64)
    im_inds = torch.tensor([2, 0, 2, 1, 0])
    locations = torch.rand(n, 2, generator=g, dtype=torch.float64) * 72
    soi = torch.tensor([64.0, 128.0, 256.0, 64.0, 1024.0], dtype=torch.float64)
    ours = dynamic_mask_head_reference(feats, params, im_inds, locations, soi, 8, channels, num_layers)
    torch.testing.assert_close(ours, _loop_of_plain_convs(feats, params, im_inds, locations, soi, 8, channels,
                                                          num_layers))


def test_reference_hand_computed_single_layer():
    # one layer: logit = wx·rel_x + wy·rel_y + wf·feature + b. Instance at (12, 20), soi 64, stride 8: pixel (row 0,
    # col 0) is centred at (4, 4), so rel = ((12-4)/64, (20-4)/64) = (0.125, 0.25); pixel (0, 1) at (12, 4): (0, 0.25)
    feats = torch.tensor([[[[1.0, -2.0]]]])              # B=1, Cmask=1, H=1, W=2
    params = torch.tensor([[4.0, 2.0, 3.0, 0.5]])        # W0 = [wx, wy, wf], b0
    out = dynamic_mask_head_reference(feats, params, torch.tensor([0]), torch.tensor([[12.0, 20.0]]),
                                      torch.tensor([64.0]), 8, channels=8, num_layers=1)
    expected = torch.tensor([[[4 * 0.125 + 2 * 0.25 + 3 * 1.0 + 0.5, 4 * 0.0 + 2 * 0.25 + 3 * -2.0 + 0.5]]])
    torch.testing.assert_close(out, expected)


# --- dispatch ---

def test_cpu_tensors_take_the_reference_path(monkeypatch):
    if DMH.TRITON_INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors go to the interpreted kernel")
    monkeypatch.setattr(DMH, "_dynamic_mask_head_op", lambda *a: pytest.fail("the custom op ran on CPU tensors"))
    feats, params, im_inds, locations, soi, head = _inputs(CASES[0])
    out = dynamic_mask_head(feats, params, im_inds, locations, soi, **head)
    assert not DMH.triton_supported(feats)
    torch.testing.assert_close(out, dynamic_mask_head_reference(feats, params, im_inds, locations, soi, **head))


def test_force_reference_switches(monkeypatch):
    monkeypatch.setattr(DMH, "triton_supported", lambda t: True)  # pretend a kernel could run
    called = []
    monkeypatch.setattr(DMH, "_dynamic_mask_head_op", lambda *a: called.append(a) or "kernel")
    feats, params, im_inds, locations, soi, head = _inputs(CASES[0])
    assert dynamic_mask_head(feats, params, im_inds, locations, soi, **head) == "kernel"
    out = dynamic_mask_head(feats, params, im_inds, locations, soi, **head, force_reference=True)
    torch.testing.assert_close(out, dynamic_mask_head_reference(feats, params, im_inds, locations, soi, **head))
    monkeypatch.setenv("ONESTAGE_FORCE_REFERENCE", "1")
    assert isinstance(dynamic_mask_head(feats, params, im_inds, locations, soi, **head), torch.Tensor)
    assert len(called) == 1
    # shapes outside the kernel's constexpr limits go to the reference too
    assert not DMH.kernel_supports(32, 8, 3, "rel") and not DMH.kernel_supports(8, 8, 5, "rel")
    assert DMH.kernel_supports(16, 16, 4, "none") and DMH.kernel_supports(8, 8, 1, "coords_only")


def test_wrong_parameter_count_raises():
    feats, params, im_inds, locations, soi, head = _inputs(CASES[0])
    with pytest.raises(ValueError, match="dynamic parameters"):
        dynamic_mask_head(feats, params[:, :-1], im_inds, locations, soi, **head)


def test_cpu_fallback_of_the_custom_op_matches_reference():
    # the op itself is valid on CPU without Triton (reference forward, torch.func backward): opcheck-able anywhere
    feats, params, im_inds, locations, soi, head = _inputs(CASES[0])
    feats.requires_grad_(True)
    params.requires_grad_(True)
    out = torch.ops.onestage.dynamic_mask_head(feats, params, im_inds, locations, soi, 8, 8, 3, "rel")
    ref = dynamic_mask_head_reference(feats, params, im_inds, locations, soi, **head)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (feats, params))
    ref_grads = torch.autograd.grad(ref.sum(), (feats, params))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# --- real GPU, realistic shapes (skipped without CUDA) ---

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("coords,num_layers,dtype", [("rel", 3, torch.float32), ("none", 3, torch.float32),
                                                     ("rel", 4, torch.float32), ("rel", 3, torch.float16)])
def test_kernel_matches_reference_on_gpu_coco_scale(coords, num_layers, dtype):
    # 100 instances on the stride-8 map of an 800×1333 image (100×167), 2 images; training-size 500 instances too
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (100, 500):
        feats = torch.randn(2, 8, 100, 167, device="cuda", generator=g).to(dtype).requires_grad_(True)
        params = (torch.randn(n, num_dynamic_params(8, 8, num_layers, coords), device="cuda", generator=g) * 0.3)
        params = params.to(dtype).requires_grad_(True)
        im_inds = torch.randint(0, 2, (n,), device="cuda", generator=g)
        locations = torch.rand(n, 2, device="cuda", generator=g) * torch.tensor([1333.0, 800.0], device="cuda")
        soi = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0], device="cuda")[
            torch.randint(0, 5, (n,), device="cuda", generator=g)]
        head = dict(mask_feat_stride=8, channels=8, num_layers=num_layers, coords=coords)
        out = dynamic_mask_head(feats, params, im_inds, locations, soi, **head)
        grad_out = torch.randn(out.shape, device="cuda", generator=g)
        grads = torch.autograd.grad(out, (feats, params), grad_out.to(out.dtype))
        f32, p32 = feats.detach().float().requires_grad_(True), params.detach().float().requires_grad_(True)
        ref = dynamic_mask_head_reference(f32, p32, im_inds, locations, soi, **head)
        ref_grads = torch.autograd.grad(ref, (f32, p32), grad_out)
        bound = 1e-4 if dtype == torch.float32 else LOW_PRECISION_BOUND["float16"]
        assert relative_error(out, ref) <= bound
        for a, b in zip(grads, ref_grads):
            assert relative_error(a, b) <= bound * 10  # sums over ~17k pixels per parameter


if __name__ == "__main__":  # the interpreter subprocess of the `interpreted` fixture
    print(json.dumps(_interpreter_checks()))
