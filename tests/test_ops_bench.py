"""The kernel benchmark's plumbing (the timings themselves need a GPU and are never asserted)."""
from __future__ import annotations

import pytest
import torch

from onestage.ops import bench


def test_without_gpu_it_says_so_and_exits(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(bench.NoGPUError, match="No CUDA GPU present"):
        bench.run_kernel_bench("cuda")
    assert bench.main([]) == 0
    assert "No CUDA GPU present" in capsys.readouterr().out


def test_cpu_device_is_refused():
    with pytest.raises(bench.NoGPUError):
        bench.run_kernel_bench("cpu")


def test_rows_and_table_at_small_shapes(monkeypatch):
    # the row builders on CPU tensors (both sides run the reference there), with the timer replaced by one call
    monkeypatch.setattr(bench, "_median_ms", lambda fn: (fn(), 2.0)[1])
    rows = bench._dynamic_mask_head_rows(torch.device("cpu"), torch.float32, 100.0, num_instances=3, height=5,
                                         width=7)
    rows += bench._focal_rows(torch.device("cpu"), torch.float32, 100.0, num_classes=4, level_sizes=[(3, 5)])
    rows += bench._blender_rows(torch.device("cpu"), torch.float32, 100.0, num_rois=2, num_bases=3, resolution=5,
                                attn_size=2)
    assert [r["op"] for r in rows] == ["dynamic_mask_head"] * 2 + ["sigmoid_focal_loss"] * 2 + ["blend"] * 2
    for r in rows:
        assert r["speedup"] == 1.0 and r["max_rel_difference"] == 0.0
        assert r["kernel_GBps"] == pytest.approx(r["bytes"] / 2e-3 / 1e9)
    # forward bytes of the head: features + params + per-instance scalars + logits, fp32
    assert rows[0]["bytes"] == 8 * 35 * 4 + 3 * 169 * 4 + 3 * 20 + 3 * 35 * 4
    assert rows[2]["bytes"] == 15 * 4 * 4 + 15 * 8
    # blender, fp32: attention 2·3·2² + crops 2·3·5² + logits 2·5² read/written once in the forward; the backward
    # reads the same, writes ∂L/∂r, writes and re-reads the fp32 ∂L/∂a', writes ∂L/∂a
    attn, crops, logits = 24, 150, 50
    assert rows[4]["bytes"] == 4 * (attn + crops + logits)
    assert rows[5]["bytes"] == 4 * (attn + crops + logits) * 2 + 4 * crops + 8 * crops + 4 * attn
    table = bench.format_kernel_bench(rows)
    assert "dynamic_mask_head" in table and "sigmoid_focal_loss" in table and "blend" in table
    assert table.count("\n") == len(rows) + 3
    assert bench.COCO_LEVEL_SIZES[0] == (100, 167) and sum(h * w for h, w in bench.COCO_LEVEL_SIZES) == 22300
