"""``python -m onestage checkpoints``: train → evaluate → fp16 export with a card, resumable, size-checked."""
import json

import torch

import onestage
from onestage.cli import main


def test_checkpoints_command_trains_exports_and_reuses_a_finished_run(tmp_path, capsys, monkeypatch):
    from onestage.config import TRAIN_PRESETS
    from onestage.data.synthetic import ensure_synthetic

    # tiny sizes and no feature cache; the model preset stays fast (the recipe's)
    monkeypatch.setitem(TRAIN_PRESETS, "fast", {**TRAIN_PRESETS["smoke"]})
    root = ensure_synthetic(tmp_path / "syn", num_train=4, num_val=2, image_size=96, progress=False)["root"]
    out, runs = tmp_path / "ckpt", tmp_path / "runs"
    argv = ["checkpoints", f"condinst@synthetic:{root}", "--out", str(out), "--runs", str(runs), "--max-iters", "2", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"| condinst | synthetic:{root} | 2 |" in text
    card = json.loads((out / "condinst_fast_synthetic.pt.json").read_text())
    assert card["iterations"] == 2 and set(card["metrics_val"]) == {"bbox", "segm"}
    assert card["model_cfg"]["mask_head_depth"] == 3 and card["git_commit"]
    assert card["preset"] == "fast" and card["model_cfg"]["freeze_at"] == 2
    assert card["command"] == "python -m onestage checkpoints condinst@synthetic --preset fast --max-iters 2"
    blob = torch.load(out / "condinst_fast_synthetic.pt", map_location="cpu", weights_only=False)
    assert all(v.dtype == torch.float16 for v in blob["model"].values() if v.is_floating_point())
    model = onestage.load_model(out / "condinst_fast_synthetic.pt")
    assert model.__class__.__name__ == "CondInst"
    before = (runs / "condinst_fast_synthetic" / "final.pt").stat().st_mtime_ns
    assert main(argv) == 0  # finished run: evaluated and exported again, not retrained
    assert (runs / "condinst_fast_synthetic" / "final.pt").stat().st_mtime_ns == before


def test_every_shipped_recipe_names_a_model_and_a_preset_and_resolves_to_its_file(tmp_path):
    from onestage.config import TRAIN_PRESETS
    from onestage.engine.shipped import SHIPPED, recipe_for, shipped_checkpoint

    assert {r.model for r in SHIPPED if r.data == "synthetic"} == set(onestage.available_models())
    for r in SHIPPED:
        assert r.preset in TRAIN_PRESETS and recipe_for(r.model, r.data) is r
        onestage.build_model(r.model, preset=r.preset, num_classes=3)  # a model preset too
        assert shipped_checkpoint(r.model, r.data, tmp_path) == tmp_path / f"{r.model}_{r.preset}_{r.data}.pt"
    assert shipped_checkpoint("fcos").parent.name == "checkpoints"
    assert recipe_for("condinst", "synthetic:/some/root") is recipe_for("condinst")
    try:
        shipped_checkpoint("fcos", "voc")
    except ValueError as e:
        assert "no shipped checkpoint of 'fcos' on 'voc'" in str(e)
    else:
        raise AssertionError("no recipe: ValueError expected")
