"""``make gpu-check`` (``onestage.gpu_check``): without a GPU it stops at once with a clear message and writes
nothing; its report renders every step's figures, and a failing step is recorded without losing the others."""
from __future__ import annotations

import json
import time

import pytest
import torch

from onestage import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_fails_at_once(tmp_path, capsys):
    from onestage.cli import main

    t0 = time.time()
    assert main(["gpu-check", "--out", str(tmp_path / "g")]) == 2
    assert time.time() - t0 < 30
    assert "needs one NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_a_failing_step_is_recorded_and_the_others_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_require_gpu", lambda: "Fake GPU")
    monkeypatch.setitem(gpu_check._STEP_FUNCS, "tests", lambda limit: {"returncode": 0, "summary": "3 passed",
                                                                       "ok": True})

    def broken(limit):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setitem(gpu_check._STEP_FUNCS, "kernels", broken)
    monkeypatch.setitem(gpu_check._STEP_FUNCS, "models", lambda limit: {
        "size": 800, "ok": True,
        "fcos": {"onestage_s": 0.010, "torchvision_s": 0.020, "ratio": 0.5},
        **{m: {"skipped": "out of time"} for m in gpu_check.MASK_MODELS}})
    monkeypatch.setitem(gpu_check._STEP_FUNCS, "train", lambda limit: {
        "ok": True, **{m: {"iterations": 60, "seconds": 6.0, "s_per_iter": 0.1, "peak_memory_mib": 900,
                           "final_loss": 1.25, "losses_finite": True} for m in gpu_check.MASK_MODELS}})
    result = gpu_check.run_gpu_check(tmp_path, log=lambda s: None)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"] == "Fake GPU" and set(saved["steps"]) == set(gpu_check.STEPS)
    assert result["steps"]["kernels"]["error"] == "RuntimeError: kernel launch failed"
    readme = (tmp_path / "README.md").read_text()
    assert "**Fake GPU**" in readme and "`pytest -m cuda`: 3 passed" in readme
    assert "**failed**: RuntimeError: kernel launch failed" in readme
    assert "| fcos | 10.0 | 20.0 | 0.50× |" in readme and "| condinst | out of time |" in readme
    assert "| blendmask | 60 | 0.100 | 900 | 1.250 | True |" in readme


def test_step_limits_fit_the_budget():
    assert sum(gpu_check.STEPS.values()) <= gpu_check.TOTAL_BUDGET_S
