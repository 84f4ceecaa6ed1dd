"""GPU benchmark of the Triton kernels of ``onestage.ops`` against their plain PyTorch references, same GPU, same run.

Shapes are COCO scale (AdelaiDet ``adet/modeling/fcos/fcos.py`` and ``adet/modeling/condinst/dynamic_mask_head.py``):

* ``dynamic_mask_head``: CondInst's default head (8 mask channels, 3 layers of 8, relative coordinates, 169
  parameters) for 100 instances on the stride-8 mask map of an 800×1333 image (100×167), batch 1 — the inference
  case — and the same map with the forward + backward (training). fp32 and fp16.
* ``sigmoid_focal_loss``: 22,300 locations (P3–P7 of one 800×1333 image: 100·167 + 50·84 + 25·42 + 13·21 + 7·11)
  × 80 classes, ~1% positives, forward and forward + backward, fp32 and fp16.
* ``blend`` (BlendMask's blender, bilinear + softmax): 100 RoIs, K = 4 bases, R = 56 crops, M = 14 attentions
  (BlendMask defaults, AdelaiDet ``adet/config/defaults.py``), forward (inference) and forward + backward
  (training), fp32 and fp16.

Each row holds the median time of the kernel and of the reference (``triton.testing.do_bench``, which flushes the L2
cache before every run), the ratio reference / kernel, the bytes the kernel must move at the least (the byte model of
each op's module docstring), the bandwidth that amounts to for both (same byte count, so it is the effective
bandwidth), the device's own copy bandwidth measured in the same run for scale, and the largest relative difference
between the kernel's and the reference's outputs (a sanity check; the tests hold the bounds).

Usage: ``rows = run_kernel_bench("cuda"); print(format_kernel_bench(rows))`` or ``python -m onestage.ops.bench``.
Without a CUDA GPU, :func:`run_kernel_bench` raises :class:`NoGPUError` and :func:`main` prints that no GPU is
present and returns 0: nothing here measures the CPU (the CPU path *is* the reference; the kernels are checked on CPU
by the tests, through Triton's interpreter).
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["run_kernel_bench", "format_kernel_bench", "NoGPUError", "main", "COCO_LEVEL_SIZES"]

#: (H, W) of P3–P7 for an 800×1333 input at strides 8..128 (ceil division, as the backbone's padding gives).
COCO_LEVEL_SIZES = [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]

NO_GPU_MESSAGE = ("No CUDA GPU present: the kernel benchmark needs one and was skipped. On CPU every op runs its "
                  "plain PyTorch reference; tests/test_ops_*.py check the Triton kernels on CPU through "
                  "TRITON_INTERPRET=1.")


class NoGPUError(RuntimeError):
    """Raised by :func:`run_kernel_bench` when no CUDA device is available."""


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy of 256 MiB: read + write bytes / time, the practical ceiling for a streaming kernel."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _row(op: str, case: str, dtype: torch.dtype, kernel: Callable, reference: Callable, bytes_moved: int,
         difference: float, copy_gbps: float) -> Dict[str, object]:
    kernel_ms = _median_ms(kernel)
    reference_ms = _median_ms(reference)
    return {
        "op": op, "case": case, "dtype": str(dtype).replace("torch.", ""),
        "kernel_ms": kernel_ms, "reference_ms": reference_ms, "speedup": reference_ms / kernel_ms,
        "bytes": int(bytes_moved),
        "kernel_GBps": bytes_moved / (kernel_ms * 1e-3) / 1e9,
        "reference_GBps": bytes_moved / (reference_ms * 1e-3) / 1e9,
        "copy_GBps": copy_gbps,
        "max_rel_difference": difference,
    }


def _dynamic_mask_head_rows(device, dtype, copy_gbps, num_instances=100, height=100, width=167,
                            seed=0) -> List[Dict[str, object]]:
    dmh = importlib.import_module("onestage.ops.dynamic_mask_head")
    cmask, channels, num_layers, coords = 8, 8, 3, "rel"
    g = torch.Generator(device=device).manual_seed(seed)
    feats = torch.randn(1, cmask, height, width, device=device, generator=g).to(dtype)
    num_params = dmh.num_dynamic_params(cmask, channels, num_layers, coords)
    params = (torch.randn(num_instances, num_params, device=device, generator=g) * 0.3).to(dtype)
    im_inds = torch.zeros(num_instances, dtype=torch.long, device=device)
    locations = torch.rand(num_instances, 2, device=device, generator=g) * torch.tensor([1333.0, 800.0],
                                                                                       device=device)
    soi = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0], device=device)[
        torch.randint(0, 5, (num_instances,), device=device, generator=g)]
    head = dict(mask_feat_stride=8, channels=channels, num_layers=num_layers, coords=coords)
    case = f"N={num_instances}, {height}x{width}, 169 params"

    def run(force_reference):
        return dmh.dynamic_mask_head(feats, params, im_inds, locations, soi, **head, force_reference=force_reference)

    e = feats.element_size()
    hw = height * width
    fwd_bytes = feats.numel() * e + params.numel() * e + num_instances * (8 + 12) + num_instances * hw * e
    out_k, out_r = run(False), run(True)
    rows = [_row("dynamic_mask_head", case + ", forward", dtype, lambda: run(False), lambda: run(True), fwd_bytes,
                 _relative_difference(out_k, out_r), copy_gbps)]

    feats_g, params_g = feats.clone().requires_grad_(True), params.clone().requires_grad_(True)
    grad_out = torch.randn(num_instances, height, width, device=device, generator=g).to(dtype)

    def train_step(force_reference):
        out = dmh.dynamic_mask_head(feats_g, params_g, im_inds, locations, soi, **head,
                                    force_reference=force_reference)
        return torch.autograd.grad(out, (feats_g, params_g), grad_out)

    blocks = -(-hw // dmh.BWD_BLOCK)
    bwd_bytes = (feats.numel() * e * 2 + params.numel() * e * 2 + num_instances * hw * e
                 + 2 * blocks * num_instances * num_params * 4)
    grads_k, grads_r = train_step(False), train_step(True)
    difference = max(_relative_difference(a, b) for a, b in zip(grads_k, grads_r))
    rows.append(_row("dynamic_mask_head", case + ", forward+backward", dtype, lambda: train_step(False),
                     lambda: train_step(True), fwd_bytes + bwd_bytes, difference, copy_gbps))
    return rows


def _focal_rows(device, dtype, copy_gbps, num_classes=80, level_sizes=COCO_LEVEL_SIZES,
                seed=0) -> List[Dict[str, object]]:
    fl = importlib.import_module("onestage.ops.focal_loss")
    num_locations = sum(h * w for h, w in level_sizes)
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(num_locations, num_classes, device=device, generator=g) * 3 - 4).to(dtype)
    targets = torch.full((num_locations,), num_classes, device=device, dtype=torch.long)
    pos = torch.randint(0, num_locations, (num_locations // 100,), device=device, generator=g)
    targets[pos] = torch.randint(0, num_classes, pos.shape, device=device, generator=g)
    case = f"L={num_locations} x C={num_classes}"

    def run(force_reference):
        return fl.sigmoid_focal_loss(logits, targets, 0.25, 2.0, force_reference=force_reference)

    e = logits.element_size()
    fwd_bytes = logits.numel() * e + num_locations * 8
    rows = [_row("sigmoid_focal_loss", case + ", forward", dtype, lambda: run(False), lambda: run(True), fwd_bytes,
                 _relative_difference(run(False), run(True)), copy_gbps)]

    logits_g = logits.clone().requires_grad_(True)

    def train_step(force_reference):
        loss = fl.sigmoid_focal_loss(logits_g, targets, 0.25, 2.0, force_reference=force_reference)
        return torch.autograd.grad(loss, logits_g)[0]

    bwd_bytes = 2 * logits.numel() * e + num_locations * 8
    rows.append(_row("sigmoid_focal_loss", case + ", forward+backward", dtype, lambda: train_step(False),
                     lambda: train_step(True), fwd_bytes + bwd_bytes,
                     _relative_difference(train_step(False), train_step(True)), copy_gbps))
    return rows


def _blender_rows(device, dtype, copy_gbps, num_rois=100, num_bases=4, resolution=56, attn_size=14,
                  seed=0) -> List[Dict[str, object]]:
    bl = importlib.import_module("onestage.ops.blender")
    g = torch.Generator(device=device).manual_seed(seed)
    bases = torch.randn(num_rois, num_bases, resolution, resolution, device=device, generator=g).to(dtype)
    attns = (3 * torch.randn(num_rois, num_bases, attn_size, attn_size, device=device, generator=g)).to(dtype)
    case = f"N={num_rois}, K={num_bases}, R={resolution}, M={attn_size}"

    def run(force_reference):
        return bl.blend(bases, attns, force_reference=force_reference)

    # byte model of the blender's module docstring: inputs read once, logits written once
    e = bases.element_size()
    crops, attn, logits = bases.numel(), attns.numel(), num_rois * resolution ** 2
    fwd_bytes = e * (attn + crops + logits)
    rows = [_row("blend", case + ", forward", dtype, lambda: run(False), lambda: run(True), fwd_bytes,
                 _relative_difference(run(False), run(True)), copy_gbps)]

    bases_g, attns_g = bases.clone().requires_grad_(True), attns.clone().requires_grad_(True)
    grad_out = torch.randn(num_rois, resolution, resolution, device=device, generator=g).to(dtype)

    def train_step(force_reference):
        out = bl.blend(bases_g, attns_g, force_reference=force_reference)
        return torch.autograd.grad(out, (bases_g, attns_g), grad_out)

    # backward: inputs + upstream gradient read, ∂L/∂r written, fp32 ∂L/∂a' written and read back, ∂L/∂a written
    bwd_bytes = e * (attn + crops + logits) + e * crops + 2 * 4 * crops + e * attn
    grads_k, grads_r = train_step(False), train_step(True)
    difference = max(_relative_difference(a, b) for a, b in zip(grads_k, grads_r))
    rows.append(_row("blend", case + ", forward+backward", dtype, lambda: train_step(False),
                     lambda: train_step(True), fwd_bytes + bwd_bytes, difference, copy_gbps))
    return rows


def run_kernel_bench(device: str = "cuda", dtypes=(torch.float32, torch.float16)) -> List[Dict[str, object]]:
    """One row per (op, case, dtype): kernel vs reference median times, ratio, effective bandwidth (module doc)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise NoGPUError(NO_GPU_MESSAGE)
    fl = importlib.import_module("onestage.ops.focal_loss")
    if not fl.HAS_TRITON:
        raise NoGPUError("Triton is not installed: the kernels cannot run (the references do).")
    torch.manual_seed(0)
    copy_gbps = _copy_bandwidth_gbps(device)
    rows: List[Dict[str, object]] = []
    for dtype in dtypes:
        rows += _dynamic_mask_head_rows(device, dtype, copy_gbps)
        rows += _focal_rows(device, dtype, copy_gbps)
        rows += _blender_rows(device, dtype, copy_gbps)
    for row in rows:
        row["device"] = torch.cuda.get_device_name(device)
        row["torch"] = torch.__version__
    return rows


def format_kernel_bench(rows: List[Dict[str, object]]) -> str:
    """Printable table of :func:`run_kernel_bench`'s rows."""
    if not rows:
        return "no rows"
    header = (f"Triton kernels vs PyTorch references on {rows[0].get('device', '?')} "
              f"(torch {rows[0].get('torch', '?')}); "
              f"median of triton.testing.do_bench; device copy bandwidth {rows[0]['copy_GBps']:.0f} GB/s")
    columns = f"{'op':<20} {'case':<44} {'dtype':<8} {'kernel ms':>10} {'ref ms':>10} {'ratio':>7} " \
              f"{'MB':>8} {'kern GB/s':>10} {'ref GB/s':>9} {'max rel diff':>12}"
    lines = [header, columns, "-" * len(columns)]
    for r in rows:
        lines.append(f"{r['op']:<20} {r['case']:<44} {r['dtype']:<8} {r['kernel_ms']:>10.3f} "
                     f"{r['reference_ms']:>10.3f} {r['speedup']:>6.1f}x {r['bytes'] / 1e6:>8.2f} "
                     f"{r['kernel_GBps']:>10.0f} {r['reference_GBps']:>9.0f} {r['max_rel_difference']:>12.1e}")
    lines.append("ratio = reference / kernel time; GB/s = the kernel's minimal bytes (MB column) / time, for both.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m onestage.ops.bench [DEVICE]``: print the table, or that no GPU is present (exit status 0)."""
    argv = sys.argv[1:] if argv is None else argv
    device = argv[0] if argv else "cuda"
    try:
        rows = run_kernel_bench(device)
    except NoGPUError as err:
        print(err)
        return 0
    print(format_kernel_bench(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
