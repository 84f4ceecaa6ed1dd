"""Benchmark smoke tests: every row and ratio is printed (speed itself is never asserted)."""
import json

import pytest

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
