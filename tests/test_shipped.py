"""``python -m onestage checkpoints``: train → evaluate → fp16 export with a card, resumable, size-checked."""
import json

import torch

import onestage
from onestage.cli import main


def test_checkpoints_command_trains_exports_and_reuses_a_finished_run(tmp_path, capsys, monkeypatch):
    from onestage.config import TRAIN_PRESETS
    from onestage.data.synthetic import ensure_synthetic

    monkeypatch.setitem(TRAIN_PRESETS, "cpu", {**TRAIN_PRESETS["smoke"]})  # tiny sizes; the model preset stays cpu
    root = ensure_synthetic(tmp_path / "syn", num_train=4, num_val=2, image_size=96, progress=False)["root"]
    out, runs = tmp_path / "ckpt", tmp_path / "runs"
    argv = ["checkpoints", f"condinst@synthetic:{root}", "--out", str(out), "--runs", str(runs), "--max-iters", "2", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"| condinst | synthetic:{root} | 2 |" in text
    card = json.loads((out / "condinst_cpu_synthetic.pt.json").read_text())
    assert card["iterations"] == 2 and set(card["metrics_val"]) == {"bbox", "segm"}
    assert card["model_cfg"]["mask_head_depth"] == 3 and card["git_commit"]
    blob = torch.load(out / "condinst_cpu_synthetic.pt", map_location="cpu", weights_only=False)
    assert all(v.dtype == torch.float16 for v in blob["model"].values() if v.is_floating_point())
    model = onestage.load_model(out / "condinst_cpu_synthetic.pt")
    assert model.__class__.__name__ == "CondInst"
    before = (runs / "condinst_cpu_synthetic" / "final.pt").stat().st_mtime_ns
    assert main(argv) == 0  # finished run: evaluated and exported again, not retrained
    assert (runs / "condinst_cpu_synthetic" / "final.pt").stat().st_mtime_ns == before
