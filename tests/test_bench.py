"""Benchmark smoke test: both rows and the ratio are printed (speed itself is never asserted)."""
from onestage.cli import main


def test_bench_prints_both_models_and_ratio(capsys):
    assert main(["bench", "--size", "64", "--repeats", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "onestage FCOS (paper preset)" in out
    assert "torchvision fcos_resnet50_fpn" in out
    assert "ratio onestage / torchvision" in out
