"""The prediction explorer: checkpoints are found by name, the explained detections are the model's own, every
detection's origin (location / cell) is consistent with the numbers that made it, and the widget redraws."""
from __future__ import annotations

import datetime
import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import onestage
from onestage.engine.checkpoint import make_checkpoint, save_checkpoint
from onestage.viz.explorer import (Explanation, _tile, describe, describe_text, explain, find_checkpoints,
                                   image_from_bytes, load_models, model_family, plot_comparison, plot_provenance,
                                   prediction_explorer, provenance_panels, shown_detections)
from onestage.modeling.fast_inference import plain_inference

NAMES = ["circle", "square", "star"]


class Images(list):
    """A minimal dataset: ``(image, target)`` pairs and ``class_names``."""

    class_names = NAMES
    num_classes = len(NAMES)


def _image(seed: int, size: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, size, size, generator=g) * 0.3
    img[:, 30:70, 40:90] += 0.6  # one bright block, so features are not pure noise
    return img.clamp(0, 1)


@pytest.fixture(scope="module")
def images():
    return Images([(_image(0), {}), (_image(1), {})])


def _smoke(name: str, **overrides):
    torch.manual_seed(0)
    model = onestage.build_model(name, preset="smoke", num_classes=len(NAMES), **overrides).eval()
    model.class_names = NAMES
    if hasattr(model, "head") and hasattr(model.head, "bbox_pred"):  # untrained: boxes 2 strides a side, not empty
        torch.nn.init.constant_(model.head.bbox_pred.bias, 2.0)
    return model


@pytest.fixture(scope="module")
def low_thresh_models():
    """Untrained models whose thresholds let candidates through, so ``model([img])`` itself returns detections."""
    fcos_like = dict(score_thresh=0.0, detections_per_img=6)
    return {"fcos": _smoke("fcos", **fcos_like), "condinst": _smoke("condinst", **fcos_like),
            "blendmask": _smoke("blendmask", **fcos_like),
            "solov2": _smoke("solov2", score_thresh=0.0, update_thresh=0.0, detections_per_img=6)}


# ------------------------------------------------------------------------------------------------ checkpoints
def test_find_checkpoints_parses_model_preset_data(tmp_path):
    for stem in ("fcos_fast_synthetic", "decoupled_solo_fast_synthetic", "condinst_cpu_nuclei",
                 "condinst_cpu_synthetic", "solov2_smoke_synthetic", "notes"):
        (tmp_path / f"{stem}.pt").write_bytes(b"")
    (tmp_path / "fcos_fast_synthetic.pt.json").write_text("{}")
    assert find_checkpoints(tmp_path) == {"decoupled_solo": tmp_path / "decoupled_solo_fast_synthetic.pt",
                                          "fcos": tmp_path / "fcos_fast_synthetic.pt"}
    assert list(find_checkpoints(tmp_path, data="nuclei", preset="cpu")) == ["condinst"]
    assert list(find_checkpoints(tmp_path, data=None)) == ["decoupled_solo_fast_synthetic", "fcos_fast_synthetic"]
    assert list(find_checkpoints(tmp_path, data=None, preset=None)) == [
        "condinst_cpu_nuclei", "condinst_cpu_synthetic", "decoupled_solo_fast_synthetic", "fcos_fast_synthetic",
        "solov2_smoke_synthetic"]


def test_load_models_uses_the_checkpoint_else_an_untrained_smoke_model(tmp_path, images):
    trained = _smoke("fcos")
    with torch.no_grad():
        trained.head.cls_logits.bias.fill_(1.5)  # a recognisable weight
    path = tmp_path / "fcos_fast_synthetic.pt"
    save_checkpoint(make_checkpoint(trained, class_names=NAMES), path)
    models = load_models(["fcos", "condinst"], find_checkpoints(tmp_path), 3, NAMES)
    assert torch.equal(models["fcos"].head.cls_logits.bias, trained.head.cls_logits.bias)
    assert "trained checkpoint fcos_fast_synthetic.pt" in models["fcos"].source
    assert "UNTRAINED smoke-preset" in models["condinst"].source
    assert models["condinst"].class_names == NAMES and models["condinst"].name == "condinst"
    assert not models["condinst"].training
    # seeded: the stand-in is the same model every time
    again = load_models(["condinst"], {}, 3, NAMES)["condinst"]
    assert torch.equal(again.controller.weight, models["condinst"].controller.weight)


# ---------------------------------------------------------------------------------------------------- images
def test_image_from_bytes_resizes_like_a_test_image():
    rgb = np.zeros((100, 200, 3), dtype=np.uint8)
    rgb[:, :100, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    img = image_from_bytes(buf.getvalue(), min_size=320, max_size=352)
    # short side 320 would make the long side 640 > 352, so the long side is capped: 200 → 352, 100 → 176
    assert img.shape == (3, 176, 352) and img.dtype == torch.float32
    assert float(img[0, 88, 10]) == pytest.approx(1.0) and float(img[0, 88, 340]) == pytest.approx(0.0)


def test_tile_places_maps_in_columns_with_nan_gaps():
    maps = torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2)
    t = _tile(maps, cols=2)
    assert t.shape == (5, 5)
    assert torch.equal(t[:2, :2], maps[0]) and torch.equal(t[:2, 3:], maps[1]) and torch.equal(t[3:, :2], maps[2])
    assert torch.isnan(t[2]).all() and torch.isnan(t[:, 2]).all() and torch.isnan(t[3:, 3:]).all()


# ---------------------------------------------------------------------------------------------- explanations
@pytest.mark.parametrize("name", ["fcos", "condinst", "blendmask", "solov2"])
def test_explained_detections_are_the_models_own(name, low_thresh_models, images):
    model = low_thresh_models[name]
    image = images[0][0]
    expl = explain(model, image)
    with torch.no_grad(), plain_inference(model):
        own = model([image])[0]
    assert len(expl) == len(own["boxes"]) > 0 and expl.note == ""
    for key in own:
        assert torch.equal(expl.detections[key], own[key]), key
    assert expl.family == model_family(model) and not model.training


@pytest.mark.parametrize("name", ["fcos", "condinst", "blendmask"])
def test_fcos_family_origin_reproduces_location_box_and_score(name, low_thresh_models, images):
    """The described feature cell is the detection's location (k·s + s/2), its regressed distances give the box,
    and sqrt(cls · ctr) there is the score (FCOS §3.1, §3.3)."""
    expl = explain(low_thresh_models[name], images[1][0])
    h, w = expl.image.shape[-2:]
    for k in range(len(expl)):
        d = describe(expl, k)
        s, (row, col), (x, y) = d["stride"], d["cell"], d["location"]
        assert (x, y) == (col * s + s // 2, row * s + s // 2)
        assert d["level"] == f"P{3 + d['level_index']}" and s == 8 * 2 ** d["level_index"]
        l, t, r, b = d["ltrb"]
        unclipped = torch.tensor([x - l, y - t, x + r, y + b])
        clipped = torch.stack([unclipped[0].clamp(0, w), unclipped[1].clamp(0, h), unclipped[2].clamp(0, w),
                               unclipped[3].clamp(0, h)])
        assert torch.allclose(clipped, torch.tensor(d["box"]), atol=0.2)
        assert d["score"] == pytest.approx((d["cls"] * d["ctr"]) ** 0.5, rel=1e-4)
    if name == "condinst":
        assert d["num_params"] == 169 and d["size_of_interest"] == 64 * 2 ** d["level_index"]
    if name == "blendmask":
        assert (d["num_bases"], d["attn_size"]) == (4, 14)


def test_solo_origin_is_a_grid_cell_whose_category_bounds_the_score(low_thresh_models, images):
    """SOLO: the score is the cell's category probability × maskness ≤ the category probability (SOLOv2 §3.3);
    the channel is k = i·S + j of the level's S×S grid."""
    expl = explain(low_thresh_models["solov2"], images[0][0])
    grids = low_thresh_models["solov2"].grid_numbers
    for k in range(len(expl)):
        d = describe(expl, k)
        i, j = d["cell"]
        assert d["grid"] == grids[d["level_index"]] and d["channel"] == i * d["grid"] + j
        assert 0 <= i < d["grid"] and 0 <= j < d["grid"]
        assert d["score"] <= d["cate"] + 1e-6
        assert d["kernel_size"] == low_thresh_models["solov2"].cfg.num_masks
    assert "grid cell (i, j)" in describe_text(expl, 0)


def test_untrained_model_falls_back_to_its_best_candidates(images):
    model = _smoke("condinst")  # default thresholds: an untrained model detects nothing
    with torch.no_grad():
        assert len(model([images[0][0]])[0]["boxes"]) == 0
    expl = explain(model, images[0][0])
    assert len(expl) > 0 and "best candidates" in expl.note
    assert expl.detections["masks"].shape == (len(expl), 128, 128)
    assert bool((expl.detections["scores"][:-1] >= expl.detections["scores"][1:]).all())  # by score


def test_describe_wraps_around_and_rejects_empty(low_thresh_models, images):
    expl = explain(low_thresh_models["fcos"], images[0][0])
    assert describe(expl, len(expl) + 1)["index"] == 1
    empty = Explanation(expl.model, "fcos", expl.image, {k: v[:0] for k, v in expl.detections.items()}, expl.parts)
    with pytest.raises(ValueError, match="no detection"):
        describe(empty, 0)
    assert describe_text(empty, 0) == "fcos: no detection"
    fig = plot_provenance(empty)
    assert fig.description is None


# ---------------------------------------------------------------------------------------------------- figures
@pytest.mark.parametrize("name,full,compact", [("fcos", 3, 3), ("condinst", 8, 4), ("blendmask", 7, 4),
                                                ("solov2", 5, 4)])
def test_provenance_panels_per_family(name, full, compact, low_thresh_models, images):
    expl = explain(low_thresh_models[name], images[0][0])
    assert len(provenance_panels(expl, 0)) == full
    assert len(provenance_panels(expl, 0, compact=True)) == compact
    fig = plot_provenance(expl, 0)
    assert isinstance(fig, Figure) and fig.description == describe(expl, 0)
    assert sum(ax.has_data() for ax in fig.axes) == full


def test_comparison_selects_among_the_shown_detections(low_thresh_models, images):
    expls = [explain(low_thresh_models[n], images[0][0]) for n in ("fcos", "solov2")]
    scores = expls[0].detections["scores"]
    thresh = float(scores[2])  # exactly three fcos detections pass (scores are sorted, distinct)
    assert torch.equal(shown_detections(expls[0], thresh), torch.arange(3))
    fig = plot_comparison(expls, thresh, instance=4)
    assert fig.selected[0] == 1  # 4 wraps around the 3 shown: the second
    solo_shown = shown_detections(expls[1], thresh)
    assert fig.selected[1] == (int(solo_shown[4 % len(solo_shown)]) if len(solo_shown) else None)
    fig = plot_comparison(expls, 1.0, 0)
    assert fig.selected == [None, None]


# ----------------------------------------------------------------------------------------------------- widget
def test_explorer_redraws_on_every_control(low_thresh_models, images):
    models = {"fcos": low_thresh_models["fcos"], "blendmask": low_thresh_models["blendmask"]}
    w = prediction_explorer(models, {"synthetic": images}, score_thresh=0.0, dpi=20, min_size=64, max_size=96)
    picture = w.children[-1]
    assert w.state.redraws == 1 and w.state.error is None and picture.value
    assert [e.name for e in w.state.explanations] == ["fcos"]
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(buf, format="PNG")
    upload = ({"name": "mine.png", "type": "image/png", "size": len(buf.getvalue()),
               "content": memoryview(buf.getvalue()),
               "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)},)
    changes = [("instance", 2), ("models", ("fcos", "blendmask")), ("image_index", 1), ("score_thresh", 0.9)]
    for name, value in changes:
        before, count = picture.value, w.state.redraws
        w.controls[name].value = value
        assert w.state.redraws == count + 1 and w.state.error is None, (name, w.state.error)
        assert picture.value != before, name
    assert [e.name for e in w.state.explanations] == ["fcos", "blendmask"]
    w.controls["source"].value = "upload"  # nothing uploaded yet: said in the caption, not raised
    assert isinstance(w.state.error, ValueError) and "no file uploaded" in w.children[-2].value
    w.controls["upload"].value = upload
    assert w.state.error is None and w.controls["source"].value == "upload"
    assert w.state.explanations[0].image.shape == (3, 64, 96)  # the upload, at the test size


def test_detections_coloured_by_error_type_against_the_ground_truth(low_thresh_models, images):
    """Issue 17 item 5: a detection on an object is a TP, the same object again a duplicate, an object nobody
    found is drawn as missed; the widget's colour control switches to it (validation images only)."""
    from onestage.viz.explorer import error_outcomes

    expl = explain(low_thresh_models["fcos"], images[0][0])
    det = expl.detections
    target = {"boxes": torch.cat([det["boxes"][:1], torch.tensor([[100.0, 100.0, 120.0, 120.0]])]),
              "labels": torch.cat([det["labels"][:1], det["labels"][:1]])}
    types, missed = error_outcomes(expl, target)
    assert types[0] == "tp" and missed == [1] and len(types) == len(det["boxes"])
    assert all(t in ("tp", "cls", "loc", "both", "dupe", "bkg") for t in types)
    fig = plot_comparison([expl], 0.0, 0, target=target)
    assert "missed" in fig.axes[0].get_title()
    w = prediction_explorer({"fcos": low_thresh_models["fcos"]}, {"synthetic": Images([(images[0][0], target)])},
                            score_thresh=0.0, dpi=20)
    before, count = w.children[-1].value, w.state.redraws
    w.controls["color_by"].value = "error"
    assert w.state.redraws == count + 1 and w.state.error is None and w.children[-1].value != before
