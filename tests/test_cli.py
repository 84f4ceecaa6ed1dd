"""Command line: every sub-command documents itself; predict writes a PNG; bad inputs give one-line errors."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from onestage.cli import build_parser, main
from onestage.engine.checkpoint import make_checkpoint, save_checkpoint
from onestage.engine.toy import ToyConfig, ToyDetector

COMMANDS = ["data", "train", "eval", "analyze", "predict", "demo", "quickstart", "checkpoints", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"
            assert action.option_strings[-1] in text


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "onestage", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS)


@pytest.fixture
def toy_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ToyDetector(ToyConfig(), num_classes=2)
    with torch.no_grad():
        model.cls.bias.copy_(torch.tensor([5.0, 0.0]))  # confident class 0: a box is drawn
    return save_checkpoint(make_checkpoint(model, class_names=["ring", "star"],
                                           train_cfg={"test_min_size": 48, "test_max_size": 64}),
                           tmp_path / "toy.pt")


def test_predict_writes_png(tmp_path, toy_checkpoint, capsys):
    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "sub" / "pred.png"
    rc = main(["predict", "--checkpoint", str(toy_checkpoint), "--image", str(image), "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 detections" in capsys.readouterr().out


def test_bad_inputs_exit_nonzero_with_a_message(tmp_path, toy_checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(toy_checkpoint), "--image", str(tmp_path / "no.png"),
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "image not found" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_text("junk")
    assert main(["eval", "--checkpoint", str(tmp_path / "junk.pt")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--preset", "smoke", "--set", "oops", "--out", str(tmp_path / "r"),
                 "--data", "coco:a.json:b"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_unreadable_images_and_unknown_formats_are_one_line_errors(tmp_path, toy_checkpoint, capsys, monkeypatch):
    """Issue 21 items 7 and 9: a truncated PNG or a non-image names the file; a bad --out format is refused before
    the checkpoint is even loaded."""
    import onestage.cli as cli
    from onestage.data.coco import ImageReadError, load_image

    good = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:120])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for bad in (truncated, text):
        with pytest.raises(ImageReadError, match=bad.name):
            load_image(str(bad))
        assert main(["predict", "--checkpoint", str(toy_checkpoint), "--image", str(bad),
                     "--out", str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err
        assert bad.name in err and "cannot read the image" in err and "Traceback" not in err

    def no_loading(*a, **k):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(cli, "_load", no_loading)
    assert main(["predict", "--checkpoint", str(toy_checkpoint), "--image", str(good),
                 "--out", str(tmp_path / "o.xyz")]) == 2
    assert "unknown image format 'xyz'" in capsys.readouterr().err


@pytest.mark.parametrize("option,field", [(["--batch-size", "0"], "batch_size=0"), (["--max-iters", "-3"], "max_iters=-3"),
                                          (["--lr", "0"], "lr=0"), (["--train-set", "flip_prob=2"], "flip_prob=2")])
def test_impossible_training_settings_stop_before_training(option, field, tmp_path, capsys):
    """Issue 21 item 5: `--max-iters -3` used to exit 0 after 0 iterations, `--batch-size 0` to fail in the loader."""
    assert main(["train", "--preset", "smoke", "--out", str(tmp_path / "r"), "--data", "coco:a.json:b", *option]) == 2
    err = capsys.readouterr().err
    assert "invalid training setting" in err and field in err
    assert not (tmp_path / "r").exists()


def test_demo_rejects_an_unknown_model_before_doing_any_work(tmp_path, capsys):
    assert main(["demo", "--model", "yolo", "--out", str(tmp_path / "d"), "--data-root", str(tmp_path / "g")]) != 0
    assert "unknown model 'yolo'" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "d").exists()


def test_eval_model_set_changes_post_processing_only(tmp_path, capsys):
    import dataclasses

    from onestage.cli import UserError, _replace_model_cfg
    from onestage.modeling import get_model_config

    cfg = get_model_config("solov2", "smoke")
    new = _replace_model_cfg(cfg, {"nms": "mask", "score_thresh": 0.2, "detections_per_img": 5})
    assert (new.nms, new.score_thresh, new.detections_per_img) == ("mask", 0.2, 5)
    assert dataclasses.replace(new, nms=cfg.nms, score_thresh=cfg.score_thresh,
                               detections_per_img=cfg.detections_per_img) == cfg
    with pytest.raises(UserError, match="not a post-processing setting.*nms_pre"):
        _replace_model_cfg(cfg, {"num_grids": 3})  # shapes the network: refused, and the allowed names are listed
    with pytest.raises(UserError, match="expected a value like"):
        _replace_model_cfg(cfg, {"nms": 3})
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--model-set", "nms=mask"]) == 2


def test_resume_refuses_changes_it_would_not_apply_and_keeps_the_runs_model(tmp_path, capsys):
    """``--resume`` with a new --lr / --model / --preset is refused (exit 2, one line naming the change), never
    recorded-but-ignored; --max-iters extends the same run; the model is the checkpoint's."""
    import json

    from onestage.data.synthetic import ensure_synthetic

    root = ensure_synthetic(tmp_path / "syn", num_train=4, num_val=2, image_size=64, progress=False)["root"]
    run = tmp_path / "run"
    base = ["train", "--data", f"synthetic:{root}", "--out", str(run), "--no-progress"]
    assert main(base + ["--model", "fcos", "--preset", "smoke", "--max-iters", "2"]) == 0
    capsys.readouterr()
    before = (run / "last.pt").read_bytes()
    for extra, needle in ((["--lr", "1e6"], "lr 0.001 -> 1000000.0"), (["--model", "condinst"], "--model condinst"),
                          (["--preset", "cpu"], "--preset cpu"), (["--batch-size", "4"], "batch_size 2 -> 4")):
        assert main(base + ["--resume", "--max-iters", "3"] + extra) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and "\n" not in err.strip(), err
    assert (run / "last.pt").read_bytes() == before
    assert main(base + ["--resume", "--max-iters", "3", "--model", "fcos"]) == 0
    assert "training fcos (smoke)" in capsys.readouterr().err
    recorded = json.loads((run / "train_config.json").read_text())
    assert recorded["train_cfg"]["max_iters"] == 3 and recorded["train_cfg"]["lr"] == 1e-3
    assert main(["train", "--resume"]) == 2 and "--resume needs --out" in capsys.readouterr().err


def test_bad_image_files_are_all_listed_before_training_or_left_out_on_request(tmp_path, capsys):
    """Issue 21 item 6: a missing image, an unreadable one, one whose size differs from the JSON and an RLE of the
    wrong size are all reported at start-up (exit 2, nothing written), not at the iteration that loads them;
    ``--skip-bad-images`` trains on the rest and says which were left out."""
    import json

    from pycocotools import mask as mask_utils

    from onestage.data.coco import CocoDataset
    from onestage.data.synthetic import ensure_synthetic

    paths = ensure_synthetic(tmp_path / "syn", num_train=6, num_val=2, image_size=64, progress=False)
    images = tmp_path / "syn" / "train"
    (images / "000001.png").unlink()
    (images / "000002.png").write_text("not an image")
    Image.new("RGB", (32, 48)).save(images / "000003.png")
    ann = json.loads(open(paths["train_ann"]).read())
    target = next(a for a in ann["annotations"] if a["image_id"] == ann["images"][4]["id"])
    rle = mask_utils.encode(np.asfortranarray(np.ones((8, 8), dtype=np.uint8)))
    target["segmentation"] = {"size": [8, 8], "counts": rle["counts"].decode()}
    ann_file = tmp_path / "train.json"
    ann_file.write_text(json.dumps(ann))

    problems = CocoDataset(ann_file, images, min_size=None).check_files()
    reasons = {p.path.rsplit("/", 1)[-1]: p.reason for p in problems}
    assert sorted(reasons) == ["000001.png", "000002.png", "000003.png", ann["images"][4]["file_name"]]
    assert reasons["000001.png"] == "file not found" and "cannot open" in reasons["000002.png"]
    assert "32x48" in reasons["000003.png"] and "RLE size [8, 8]" in reasons[ann["images"][4]["file_name"]]
    assert CocoDataset(ann_file, images, min_size=None, with_masks=False).check_files()[-1].path.endswith("3.png")

    run = tmp_path / "run"
    argv = ["train", "--model", "condinst", "--preset", "smoke", "--max-iters", "1", "--data",
            f"coco:{ann_file}:{images}", "--out", str(run), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "4 image(s) cannot be used" in err and "--skip-bad-images" in err
    assert all(name in err for name in reasons) and not (run / "last.pt").exists()
    assert main(argv + ["--skip-bad-images"]) == 0
    assert (run / "final.pt").is_file()
    recorded = json.loads((run / "train_config.json").read_text())
    assert recorded["train_cfg"]["skip_bad_images"] is True


def test_eval_on_an_annotation_file_without_annotations_is_an_error(tmp_path, toy_checkpoint, capsys):
    """Issue 21 item 8: it used to print '-' in every column and exit 0."""
    import json

    from onestage.data.synthetic import ensure_synthetic

    paths = ensure_synthetic(tmp_path / "syn", num_train=2, num_val=2, image_size=64, progress=False)
    ann = json.loads(open(paths["val_ann"]).read())
    crowd = {**ann["annotations"][0], "iscrowd": 1}  # a crowd region is not ground truth to match either
    ann_file = tmp_path / "unlabelled.json"
    ann_file.write_text(json.dumps({**ann, "annotations": [crowd]}))
    assert main(["eval", "--checkpoint", str(toy_checkpoint), "--data", f"coco:{ann_file}:{paths['val_images']}",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unlabelled.json: no annotations for its 2 image(s)" in err and "predict" in err


def test_analyze_a_results_file_writes_the_summary_and_figures(tmp_path, capsys):
    """Issue 17 item 2, on a results file (any toolbox's): the ground truth itself as detections is perfect."""
    import json

    from onestage.data.synthetic import ensure_synthetic

    paths = ensure_synthetic(tmp_path / "syn", num_train=2, num_val=3, image_size=64, progress=False)
    gt = json.loads(open(paths["val_ann"]).read())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    (tmp_path / "res.json").write_text(json.dumps(results))
    data = f"coco:{paths['val_ann']}:{paths['val_images']}"
    assert main(["analyze", str(tmp_path / "res.json"), "--data", data, "--out", str(tmp_path / "an")]) == 0
    for name in ("summary.json", "pr_curves.png", "confusion_matrix.png", "errors.png", "worst_images.png"):
        assert (tmp_path / "an" / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "an" / "summary.json").read_text())
    errors = summary["analysis"]["bbox"]["errors"]
    assert errors["ap"] == 100.0 and sum(errors["counts"].values()) == 0
    assert summary["main_iou_type"] == "bbox" and "segm" not in summary["analysis"]
    (tmp_path / "bad.json").write_text(json.dumps([{**results[0], "image_id": 999}]))
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "bad.json"), "--data", data, "--out", str(tmp_path / "an2")]) == 2
    assert "not in" in capsys.readouterr().err
