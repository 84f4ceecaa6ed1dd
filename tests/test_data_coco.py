"""CocoDataset on small hand-made COCO files: targets, resizing, flips, segmentation formats, bad input."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from onestage.data import CocoDataset, collate_fn, pad_collate
from onestage.structures import masks_to_boxes

H, W = 40, 60


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    if compressed:
        r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": r["counts"].decode()}
    # uncompressed RLE: run lengths over the column-major flattening, starting with a run of zeros
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _write(tmp_path, images, annotations, categories=None, image_arrays=None):
    """Write ``ann.json`` and the images (random RGB unless given) into ``tmp_path``; return both paths."""
    categories = categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    for img in images:
        arr = (image_arrays or {}).get(img["id"])
        if arr is None:
            arr = np.random.default_rng(img["id"]).integers(0, 256, (img["height"], img["width"], 3), dtype=np.uint8)
        if not isinstance(arr, Image.Image):
            arr = Image.fromarray(arr)
        arr.save(tmp_path / img["file_name"])
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, tmp_path


def _img(i=1, h=H, w=W):
    return {"id": i, "file_name": f"{i}.png", "height": h, "width": w}


def _box_ann(i, x, y, w, h, cat=1, img=1, **extra):
    seg = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"id": i, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
            "segmentation": seg, "iscrowd": 0, **extra}


def test_target_contract_and_collate(tmp_path):
    ann_file, d = _write(tmp_path, [_img(1), _img(2)], [_box_ann(1, 10, 5, 20, 10), _box_ann(2, 30, 20, 10, 15, cat=2)])
    ds = CocoDataset(ann_file, d, min_size=None)
    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W) and 0 <= image.min() and image.max() <= 1
    assert t["boxes"].dtype == torch.float32 and t["boxes"].tolist() == [[10, 5, 30, 15], [30, 20, 40, 35]]
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [0, 1]
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, H, W)
    assert t["masks"][0].sum() > 0 and torch.equal(masks_to_boxes(t["masks"]), t["boxes"])
    assert t["image_id"] == 1 and t["orig_size"].tolist() == [H, W] and t["size"].tolist() == [H, W]
    assert torch.allclose(image, torch.from_numpy(np.array(Image.open(d / "1.png"))).permute(2, 0, 1) / 255.0)

    images, targets = collate_fn([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2 and targets[1]["image_id"] == 2
    batch, targets = pad_collate([ds[0], ds[1]], size_divisibility=32)
    assert batch.shape == (2, 3, 64, 64) and torch.equal(batch[0, :, :H, :W], images[0])


def test_resize_keeps_aspect_and_caps_max_size(tmp_path):
    ann_file, d = _write(tmp_path, [_img(1, 100, 200)], [_box_ann(1, 20, 10, 40, 30)])
    image, t = CocoDataset(ann_file, d, min_size=(50,), max_size=1000)[0]
    assert image.shape[1:] == (50, 100) and t["size"].tolist() == [50, 100] and t["orig_size"].tolist() == [100, 200]
    assert t["boxes"].tolist() == [[10, 5, 30, 20]] and t["masks"].shape == (1, 50, 100)
    image, t = CocoDataset(ann_file, d, min_size=(80,), max_size=120)[0]  # 80x160 would exceed 120: capped
    assert image.shape[1:] == (60, 120)
    assert torch.allclose(t["boxes"], torch.tensor([[12.0, 6.0, 36.0, 24.0]]))
    assert torch.allclose(masks_to_boxes(t["masks"]), t["boxes"], atol=1)


def test_train_picks_sizes_from_min_size_test_uses_first(tmp_path):
    ann_file, d = _write(tmp_path, [_img(1, 100, 100)], [_box_ann(1, 20, 10, 40, 30)])
    train = CocoDataset(ann_file, d, train=True, min_size=(32, 48, 64), max_size=1000)
    torch.manual_seed(0)
    seen = {train[0][0].shape[1] for _ in range(30)}
    assert seen == {32, 48, 64}
    test = CocoDataset(ann_file, d, train=False, min_size=(32, 48, 64), max_size=1000)
    assert {test[0][0].shape[1] for _ in range(5)} == {32}


def test_flip_flips_image_boxes_and_masks_consistently(tmp_path):
    ann_file, d = _write(tmp_path, [_img(1)], [_box_ann(1, 5, 5, 10, 20), _box_ann(2, 40, 2, 15, 8, cat=2)])
    plain_img, plain = CocoDataset(ann_file, d, train=True, flip_prob=0.0, min_size=None)[0]
    flip_img, flipped = CocoDataset(ann_file, d, train=True, flip_prob=1.0, min_size=None)[0]
    assert torch.equal(flip_img, plain_img.flip(-1))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    assert flipped["boxes"].tolist() == [[W - 15, 5, W - 5, 25], [W - 55, 2, W - 40, 10]]
    assert torch.equal(masks_to_boxes(flipped["masks"]), flipped["boxes"])
    assert torch.equal(flipped["labels"], plain["labels"])
    # evaluation never flips
    _, t = CocoDataset(ann_file, d, train=False, flip_prob=1.0, min_size=None)[0]
    assert torch.equal(t["boxes"], plain["boxes"])


def test_polygon_rle_and_crowd(tmp_path):
    m_unc = np.zeros((H, W), bool)
    m_unc[2:9, 30:41] = True
    m_cmp = np.zeros((H, W), bool)
    m_cmp[20:30, 5:10] = True
    m_cmp[25:35, 10:12] = True  # an L shape: not its box
    crowd = np.zeros((H, W), bool)
    crowd[30:40, 40:60] = True
    anns = [
        _box_ann(1, 10, 10, 10, 10),  # polygon
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 2, 11, 7], "area": 77,
         "segmentation": _rle(m_unc, compressed=False), "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 20, 7, 15], "area": int(m_cmp.sum()),
         "segmentation": _rle(m_cmp), "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [40, 30, 20, 10], "area": 200,
         "segmentation": _rle(crowd, compressed=False), "iscrowd": 1},
    ]
    ann_file, d = _write(tmp_path, [_img(1)], anns)
    ds = CocoDataset(ann_file, d, min_size=None)
    _, t = ds[0]
    assert t["labels"].tolist() == [0, 1, 0]  # the crowd region is not a training target
    assert t["masks"][0, 10:20, 10:20].all() and t["masks"][0].sum() == 100
    assert np.array_equal(t["masks"][1].numpy().astype(bool), m_unc)
    assert np.array_equal(t["masks"][2].numpy().astype(bool), m_cmp)
    assert ds.skipped["crowd"] == 1
    assert 4 in ds.coco.anns and ds.coco.anns[4]["iscrowd"] == 1  # but stays in the GT for COCOeval


def test_label_mapping_follows_sorted_category_ids(tmp_path):
    cats = [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    anns = [_box_ann(1, 1, 1, 5, 5, cat=10), _box_ann(2, 10, 1, 5, 5, cat=3), _box_ann(3, 20, 1, 5, 5, cat=7)]
    ann_file, d = _write(tmp_path, [_img(1)], anns, categories=cats)
    ds = CocoDataset(ann_file, d, min_size=None)
    assert ds.cat_ids == [3, 7, 10] and ds.class_names == ["three", "seven", "ten"] and ds.num_classes == 3
    assert ds.cat_id_to_label == {3: 0, 7: 1, 10: 2} and ds.label_to_cat_id == [3, 7, 10]
    assert ds[0][1]["labels"].tolist() == [2, 0, 1]


def test_image_without_annotations_and_skip_empty(tmp_path):
    ann_file, d = _write(tmp_path, [_img(1), _img(2, 30, 20)], [_box_ann(1, 1, 1, 5, 5)])
    ds = CocoDataset(ann_file, d, min_size=None)
    assert ds.ids == [1, 2]
    _, t = ds[1]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 30, 20)
    _, t = CocoDataset(ann_file, d, min_size=None, with_masks=False)[1]
    assert "masks" not in t and t["boxes"].shape == (0, 4)
    assert CocoDataset(ann_file, d, min_size=None, skip_empty=True).ids == [1]


def test_missing_image_file_names_the_path(tmp_path):
    ann_file, d = _write(tmp_path, [_img(1)], [])
    (d / "1.png").unlink()
    ds = CocoDataset(ann_file, d)
    with pytest.raises(FileNotFoundError, match="1.png"):
        ds[0]


def test_undeclared_category_fails_at_construction(tmp_path):
    ann_file, d = _write(tmp_path, [_img(1)], [_box_ann(17, 1, 1, 5, 5, cat=99)])
    with pytest.raises(ValueError, match=r"annotation 17 .*category_id 99"):
        CocoDataset(ann_file, d)


def test_box_outside_image_is_clipped_and_counted(tmp_path, caplog):
    ann = _box_ann(5, 50, 30, 20, 20)  # reaches x=70 > 60 and y=50 > 40
    ann_file, d = _write(tmp_path, [_img(1)], [ann])
    with caplog.at_level(logging.WARNING, logger="onestage.data.coco"):
        ds = CocoDataset(ann_file, d, min_size=None)
    assert ds.skipped["box_clipped"] == 1 and "annotation 5" in caplog.text
    _, t = ds[0]
    assert t["boxes"].tolist() == [[50, 30, 60, 40]]
    ds[0]
    assert ds.skipped["box_clipped"] == 1  # counted once, not once per access


def test_degenerate_boxes_are_skipped_and_counted(tmp_path):
    anns = [_box_ann(1, 5, 5, 0, 10), _box_ann(2, 5, 5, 10, -1), _box_ann(3, 100, 100, 5, 5), _box_ann(4, 1, 1, 5, 5)]
    ann_file, d = _write(tmp_path, [_img(1)], anns)
    ds = CocoDataset(ann_file, d, min_size=None)
    assert ds.skipped["degenerate_box"] == 3
    assert ds[0][1]["boxes"].tolist() == [[1, 1, 6, 6]]


def test_empty_segmentation_is_dropped_when_masks_requested(tmp_path):
    anns = [
        dict(_box_ann(1, 1, 1, 5, 5), segmentation=[]),
        dict(_box_ann(2, 10, 1, 5, 5), segmentation=[[1, 2, 3, 4]]),  # two points: no area
        dict(_box_ann(3, 20, 1, 5, 5), segmentation=_rle(np.zeros((H, W), bool))),  # decodes to nothing
        _box_ann(4, 30, 1, 5, 5),
    ]
    ann_file, d = _write(tmp_path, [_img(1)], anns)
    ds = CocoDataset(ann_file, d, min_size=None)
    _, t = ds[0]
    assert t["boxes"].tolist() == [[30, 1, 35, 6]] and t["masks"].shape == (1, H, W)
    assert ds.skipped["empty_segmentation"] == 3
    # boxes alone are still usable for a detector
    _, t = CocoDataset(ann_file, d, min_size=None, with_masks=False)[0]
    assert t["boxes"].shape == (4, 4)


def test_invalid_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        CocoDataset(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(tmp_path / "nope.json", tmp_path)


def test_image_size_mismatch_is_an_error(tmp_path):
    ann_file, d = _write(tmp_path, [_img(1)], [], image_arrays={1: np.zeros((W, H, 3), np.uint8)})
    with pytest.raises(ValueError, match="1.png"):
        CocoDataset(ann_file, d)[0]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_become_rgb_float(tmp_path, mode):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = (200, 100, 50)
    if mode == "L":
        pil, expected = Image.fromarray(rgb[..., 0]), np.repeat(rgb[..., :1], 3, 2) / 255.0
    elif mode == "RGBA":
        rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], axis=2)  # alpha is dropped, not composited
        pil, expected = Image.fromarray(rgba), rgb / 255.0
    elif mode == "P":
        pil, expected = Image.fromarray(rgb).quantize(colors=4), rgb / 255.0
    else:
        grey16 = np.zeros((H, W), np.uint16)
        grey16[:, : W // 2] = 65535
        grey16[:, W // 2 :] = 13107  # 0.2 of the full range: scaled by 65535, not by the image maximum
        pil = Image.fromarray(grey16)
        expected = np.repeat((grey16 / 65535.0)[..., None], 3, 2)
    assert pil.mode.startswith(mode[0])
    ann_file, d = _write(tmp_path, [_img(1)], [], image_arrays={1: pil})
    image, _ = CocoDataset(ann_file, d, min_size=None)[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert torch.allclose(image, torch.from_numpy(expected).permute(2, 0, 1).float(), atol=1e-4)
