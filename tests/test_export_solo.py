"""ONNX export of the SOLO family (``onestage.export``, section "the SOLO family"): the graph of each shipped SOLO,
Decoupled SOLO and SOLOv2 checkpoint, run by onnxruntime, gives the detections ``model([image])`` gives — on three
synthetic validation images at the checkpoint's test size and on a grey image with nothing to detect; a graph
traced on an image with nothing to detect still gives the model's detections on a real one; random-weight smoke
models too; greedy mask NMS is refused clearly. Tolerances (issue 19): same detection count, boxes within 1 px,
scores within 1e-3, labels equal, mask IoU ≥ 0.99 per instance (matched in order; detections whose scores tie may
be matched by best mask IoU instead, with a warning). The exports are shared by the module (one per model).
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

pytest.importorskip("onnxruntime")

import onestage  # noqa: E402
from export_helpers import assert_parity, shipped_models  # noqa: E402
from export_helpers import reference as _reference  # noqa: E402
from onestage import export  # noqa: E402

MODELS = ["solo", "decoupled_solo", "solov2"]


@pytest.fixture(scope="module")
def shipped():
    """Per model: the shipped checkpoint in float32 and its test size (the card's ``test_min_size``)."""
    return shipped_models(MODELS)


@pytest.fixture(scope="module")
def val_images(shipped):
    """Three synthetic validation images per test size."""
    from onestage.data import get_dataset

    out = {}
    for size in {s for _, s in shipped.values()}:
        val = get_dataset("synthetic", split="val", min_size=(size,), max_size=size, with_masks=False)
        out[size] = [val[k][0] for k in range(3)]
    return out


@pytest.fixture(scope="module")
def graphs(shipped, val_images, tmp_path_factory):
    """One graph per model at its test size, exported once for the module."""
    folder = tmp_path_factory.mktemp("onnx_solo")
    out = {}
    for name, (model, size) in shipped.items():
        hw = tuple(val_images[size][0].shape[-2:])
        out[name] = export.onnx_session(export.export_onnx(model, folder / f"{name}.onnx", hw))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_shipped_graph_matches_the_model_on_synthetic_val(name, shipped, graphs, val_images):
    model, size = shipped[name]
    total = 0
    for k, image in enumerate(val_images[size]):
        cmp = assert_parity(export.run_onnx(graphs[name], image), _reference(model, image), f"{name} #{k}")
        total += cmp["detections"]
    assert total > 0  # the shipped models do segment the shapes


@pytest.mark.parametrize("name", MODELS)
def test_nothing_to_detect_gives_an_empty_result(name, shipped, graphs, val_images):
    model, size = shipped[name]
    image = torch.full_like(val_images[size][0], 0.5)
    ours, ref = export.run_onnx(graphs[name], image), _reference(model, image)
    assert ref["scores"].shape[0] == 0
    assert_parity(ours, ref, f"{name} on a grey image")
    assert tuple(ours["masks"].shape) == (0, *image.shape[-2:]) and tuple(ours["boxes"].shape) == (0, 4)


def test_graph_traced_on_an_empty_image_still_detects(shipped, val_images, tmp_path):
    """Nothing detected while tracing: the graph must still hold the general path (no ``if n == 0`` branch taken,
    no one-element broadcast recorded) — vanilla SOLO, whose masks are built level by level."""
    model, size = shipped["solo"]
    image = val_images[size][0]
    blank = torch.full_like(image, 0.5)[None]
    assert _reference(model, blank[0])["scores"].shape[0] == 0
    wrapper = export.OnnxDetector(model).eval()
    path = tmp_path / "solo_traced_on_grey.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (blank,), str(path), input_names=["image"], output_names=wrapper.output_names,
                          opset_version=export.EXPORT_OPSET, dynamo=False)
    cmp = assert_parity(export.run_onnx(export.onnx_session(path), image), _reference(model, image), "traced on grey")
    assert cmp["detections"] > 0


def _smoke_model(name: str):
    """A smoke-preset model with random weights, its priors moved so that it detects something: the category bias
    at −2.3 with the weights ×3 (scores around the 0.1 threshold, a few hundred candidates), the mask biases at 2
    (σ ≈ 0.88, as bench does: at the focal prior every mask would be empty and dropped)."""
    torch.manual_seed(0)
    model = onestage.build_model(name, preset="smoke", num_classes=3).eval()
    with torch.no_grad():
        model.head.cate_pred.bias.fill_(-2.3)
        model.head.cate_pred.weight.mul_(3.0)
        for preds in ("mask_preds", "mask_preds_x", "mask_preds_y"):
            for conv in getattr(model.head, preds, None) or ():
                conv.bias.fill_(2.0)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_smoke_models_with_random_weights(name, tmp_path):
    model = _smoke_model(name)
    image = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1))
    session = export.onnx_session(export.export_onnx(model, tmp_path / f"{name}.onnx", (96, 96)))
    cmp = assert_parity(export.run_onnx(session, image), _reference(model, image), f"smoke {name}")
    assert cmp["detections"] > 0


def test_greedy_mask_nms_is_refused_clearly(tmp_path):
    model = onestage.build_model("solo", preset="smoke", num_classes=3)
    model.cfg = dataclasses.replace(model.cfg, nms="mask")
    with pytest.raises(NotImplementedError, match="nms='mask'"):
        export.export_onnx(model, tmp_path / "x.onnx", (64, 64))
    assert not (tmp_path / "x.onnx").exists()
