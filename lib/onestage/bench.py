"""Inference speed of onestage FCOS against torchvision's ``fcos_resnet50_fpn`` on the same machine, same run.

Both models are R-50-FPN FCOS with random weights (nothing is downloaded), in eval mode under
``torch.inference_mode``, on one ``size×size`` image. torchvision's model is configured with
``min_size = max_size = size`` so its internal transform keeps the input size; that transform (resize + normalise +
batch) is part of its forward, just as normalise + pad is part of ours, so both timings are end to end from a 0..1
image to final detections. The transform's own cost is timed separately and printed for reference.

With random weights, many locations pass the 0.05 score threshold, so post-processing (top-k, NMS) runs at its
worst case in both models. Speed is reported as ratios, never asserted in tests.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

__all__ = ["run_bench", "format_bench"]


def _time(fn, repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_bench(size: int = 512, repeats: int = 10, warmup: int = 3, device: Optional[str] = None,
              preset: str = "paper", num_classes: int = 80, seed: int = 0) -> dict:
    """Median seconds per image for both models (and torchvision's transform alone); see the module doc."""
    import torchvision
    from torchvision.models.detection import fcos_resnet50_fpn

    import onestage

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    ours = onestage.build_model("fcos", preset=preset, num_classes=num_classes).to(device).eval()
    theirs = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                               min_size=size, max_size=size).to(device).eval()
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)

    with torch.inference_mode():
        t_ours = _time(lambda: ours([image]), repeats, warmup, device)
        t_theirs = _time(lambda: theirs([image]), repeats, warmup, device)
        t_transform = _time(lambda: theirs.transform([image]), repeats, warmup, device)
    return {
        "device": str(device),
        "size": size,
        "repeats": repeats,
        "preset": preset,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onestage_s": t_ours,
        "torchvision_s": t_theirs,
        "torchvision_transform_s": t_transform,
        "ratio": t_ours / t_theirs,
    }


def format_bench(r: dict) -> str:
    """Human-readable table of :func:`run_bench`'s result."""
    return "\n".join([
        f"FCOS inference, {r['size']}x{r['size']}, batch 1, {r['device']}, median of {r['repeats']} "
        f"(torch {r['torch']}, torchvision {r['torchvision']})",
        f"  onestage FCOS ({r['preset']} preset) : {r['onestage_s'] * 1000:9.1f} ms/img",
        f"  torchvision fcos_resnet50_fpn       : {r['torchvision_s'] * 1000:9.1f} ms/img"
        f"  (of which transform {r['torchvision_transform_s'] * 1000:.1f} ms)",
        f"  ratio onestage / torchvision        : {r['ratio']:9.2f}x",
    ])
