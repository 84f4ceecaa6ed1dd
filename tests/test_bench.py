"""Benchmark smoke tests: every row and ratio is printed (speed itself is never asserted)."""
import json

import torch

from onestage.cli import main


def test_bench_prints_both_models_and_ratio(capsys):
    assert main(["bench", "fcos", "--size", "64", "--repeats", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "onestage FCOS (paper preset)" in out
    assert "torchvision fcos_resnet50_fpn" in out
    assert "ratio onestage / torchvision" in out


def test_mask_bench_forces_the_same_number_of_instances(capsys, tmp_path):
    path = tmp_path / "b.json"
    assert main(["bench", "condinst", "mask-heads", "--size", "96", "--repeats", "1", "--warmup", "0", "--device",
                 "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "torchvision maskrcnn_resnet50_fpn" in out and "Mask R-CNN MaskRCNNHeads" in out
    r = json.loads(path.read_text())
    assert r["condinst"]["instances_onestage"] == 100 == r["condinst"]["instances_torchvision"]
    heads = r["mask-heads"]
    assert [row["params"] for row in heads["condinst"]][:4] == [11, 97, 169, 241]
    assert heads["maskrcnn_params"] > 2_000_000


def test_unknown_bench_target_is_a_clear_error(capsys):
    assert main(["bench", "yolo", "--size", "64"]) != 0
    assert "unknown bench target" in capsys.readouterr().err


def test_overlapping_masks_are_deterministic_clusters_of_near_duplicates():
    from onestage.bench import overlapping_masks
    from onestage.structures import mask_iou

    masks, scores, labels = overlapping_masks(60, (48, 64), num_clusters=6, seed=3)
    again = overlapping_masks(60, (48, 64), num_clusters=6, seed=3)
    assert masks.shape == (60, 48, 64) and masks.dtype == torch.bool
    assert torch.equal(masks, again[0]) and torch.equal(scores, again[1]) and torch.equal(labels, again[2])
    assert masks.flatten(1).any(1).float().mean() > 0.9
    # every mask has a near-duplicate (IoU > 0.5) of its own class: something for an NMS to remove
    iou = mask_iou(masks, masks).fill_diagonal_(0) * (labels[:, None] == labels[None, :])
    assert (iou.max(1).values > 0.5).float().mean() > 0.8


def test_nms_bench_times_both_nms_on_the_same_masks(capsys, tmp_path):
    from onestage.bench import time_nms
    from onestage.modeling.solo import matrix_nms
    from onestage.structures import mask_nms

    path = tmp_path / "n.json"
    assert main(["bench", "nms", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Matrix NMS" in out and "greedy mask" in out and "matrix/greedy" in out
    rows = json.loads(path.read_text())["nms"]["rows"]
    assert [r["mask_hw"] for r in rows] == [[64, 64], [200, 336]]
    small = time_nms(num_masks=40, mask_sizes=((32, 32),), repeats=1, warmup=0, device="cpu")["rows"][0]
    from onestage.bench import overlapping_masks
    masks, scores, labels = overlapping_masks(40, (32, 32))
    assert small["kept_greedy"] == mask_nms(masks, scores, labels, 0.5).numel() < 40
    assert small["kept_matrix"] == int((matrix_nms(masks, labels, scores) >= 0.05).sum())
    assert all(small[k] > 0 for k in ("matrix_ms", "greedy_ms", "iou_only_ms", "torchvision_box_ms"))


def test_solo_bench_keeps_its_candidate_masks(tmp_path):
    # untrained SOLO masks sit at the focal prior (all below the mask threshold); the bench opens them so that
    # SOLO, like Mask R-CNN, returns the forced 100 instances instead of timing an empty post-processing
    path = tmp_path / "s.json"
    assert main(["bench", "solo", "--size", "96", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json",
                 str(path)]) == 0
    r = json.loads(path.read_text())["solo"]
    assert r["instances_onestage"] == 100 == r["instances_torchvision"]


def test_onnx_column_times_the_exported_graph(capsys, tmp_path):
    import pytest

    pytest.importorskip("onnxruntime")
    path = tmp_path / "b.json"
    assert main(["bench", "blendmask", "--size", "96", "--preset", "smoke", "--repeats", "1", "--warmup", "0",
                 "--device", "cpu", "--onnx", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "onestage in onnxruntime" in out
    r = json.loads(path.read_text())["blendmask"]
    # the graph returns what the model returns on the same image: the forced 100 instances
    assert r["instances_onnxruntime"] == r["instances_onestage"] == 100
    assert r["onnxruntime_s"] > 0 and r["onnxruntime_ratio"] > 0
