"""Checkpoints: atomic writes survive a failure mid-write; models rebuild from the stored config; RNGs round-trip."""
import random

import numpy as np
import pytest
import torch

from onestage.engine import checkpoint as ck
from onestage.engine.toy import ToyConfig, ToyDetector


def _ckpt(model, it=0):
    return ck.make_checkpoint(model, iteration=it, class_names=["a", "b"])


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    model = ToyDetector(ToyConfig())
    ck.save_checkpoint(_ckpt(model, it=3), path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")  # bytes hit the temp file, then the "disk" fails
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(_ckpt(model, it=4), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not (tmp_path / "last.pt.tmp").exists()
    assert ck.load_checkpoint(path)["iteration"] == 3


def test_load_model_rebuilds_from_stored_config(tmp_path):
    model = ToyDetector(ToyConfig(width=6))  # not the default width: must come from the stored cfg, not a preset
    path = ck.save_checkpoint(_ckpt(model), tmp_path / "m.pt")
    loaded = ck.load_model(path)
    assert loaded.cfg == model.cfg and not loaded.training
    assert loaded.class_names == ["a", "b"]
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    raw = ck.load_checkpoint(path)
    for key in ("format", "model_name", "model_cfg", "num_classes", "class_names", "model", "optimizer",
                "scheduler", "scaler", "rng", "iteration", "train_cfg", "git_commit"):
        assert key in raw


def test_rng_state_round_trip():
    state = ck.get_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    ck.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        ck.load_checkpoint(junk)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an onestage-checkpoint-v1"):
        ck.load_checkpoint(tmp_path / "foreign.pt")


def test_export_model_is_small_fp16_and_loads_back(tmp_path):
    model = ToyDetector(ToyConfig(width=6))
    src = ck.save_checkpoint(_ckpt(model), tmp_path / "train.pt")
    dst = ck.export_model(src, tmp_path / "small.pt", card={"AP": 12.5, "data": "toy"})
    raw = ck.load_checkpoint(dst)
    assert "optimizer" not in raw and "rng" not in raw
    assert all(v.dtype == torch.float16 for v in raw["model"].values() if v.is_floating_point())
    assert raw["card"] == {"AP": 12.5, "data": "toy"}
    assert (tmp_path / "small.pt.json").read_text().strip().startswith("{")
    assert ck.checkpoint_card(dst) == {"AP": 12.5, "data": "toy"} and ck.checkpoint_card(src) == {}
    loaded = ck.load_model(dst)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == a.dtype, k  # cast back to the model's own precision
        torch.testing.assert_close(b.float(), a.float(), atol=1e-3, rtol=1e-3), k


def test_a_checkpoint_naming_a_foreign_module_is_refused_without_importing_it(tmp_path, monkeypatch):
    """A crafted checkpoint must not make the loader import a module of its choosing (importing runs its code)."""
    import sys

    from onestage.engine.checkpoint import model_from_checkpoint

    flag = tmp_path / "imported"
    (tmp_path / "planted_module_xyz.py").write_text(f"open({str(flag)!r}, 'w').close()\nclass C: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = {"model_name": "not_a_model", "model_cfg_class": "planted_module_xyz:C",
            "model_class": "planted_module_xyz:C", "model_cfg": {}, "num_classes": 1, "model": {}}
    with pytest.raises(ValueError, match="outside the onestage package"):
        model_from_checkpoint(ckpt)
    assert not flag.exists() and "planted_module_xyz" not in sys.modules
    # inside the package, but not a config dataclass + nn.Module: refused as well
    ckpt.update(model_cfg_class="onestage.cli:main", model_class="onestage.cli:main")
    with pytest.raises(ValueError, match="not a model config dataclass"):
        model_from_checkpoint(ckpt)
