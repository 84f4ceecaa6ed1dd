"""COCOeval wiring: ground truth given back as predictions scores AP = 100, also after the dataset's resize."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO

from onestage.engine.evaluate import METRIC_NAMES, evaluate, format_metrics

# two images; non-contiguous category ids (3, 7) exercise label_to_cat_id
RECTS = {1: [(10, 10, 50, 50, 3), (60, 20, 96, 90, 7)], 2: [(0, 0, 110, 96, 7)]}  # medium + large


def _write_coco(tmp_path):
    images, anns = [], []
    for img_id, rects in RECTS.items():
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": 100, "width": 120})
        for x0, y0, x1, y1, cat in rects:
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 3, "name": "ring"}, {"id": 7, "name": "star"}]}))
    return path


class GtDataset:
    """Minimal CocoDataset stand-in: images resized by ``scale``; targets carry the GT at the resized size."""

    def __init__(self, ann_file, scale=1.0):
        self.coco = COCO(str(ann_file))
        self.ids = sorted(self.coco.getImgIds())
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_to_cat_id = {i: c for i, c in enumerate(self.cat_ids)}
        self.scale = scale

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        img_id = self.ids[i]
        info = self.coco.imgs[img_id]
        oh, ow = info["height"], info["width"]
        h, w = round(oh * self.scale), round(ow * self.scale)
        anns = self.coco.imgToAnns[img_id]
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
        masks = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest")[:, 0].bool()
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]) * self.scale
        labels = torch.tensor([self.cat_ids.index(a["category_id"]) for a in anns])
        return torch.zeros(3, h, w), {"boxes": boxes, "labels": labels, "masks": masks, "image_id": img_id,
                                      "orig_size": (oh, ow), "size": (h, w)}


class OracleModel(torch.nn.Module):
    """Returns the dataset's own targets as predictions (images are matched by call order)."""

    def __init__(self, dataset, empty=False):
        super().__init__()
        self.targets = [dataset[i][1] for i in range(len(dataset))]
        self.empty, self.calls = empty, 0

    def forward(self, images):
        out = []
        for _ in images:
            t = self.targets[self.calls]
            self.calls += 1
            n = 0 if self.empty else len(t["boxes"])
            out.append({"boxes": t["boxes"][:n], "labels": t["labels"][:n], "scores": torch.ones(n),
                        "masks": t["masks"][:n]})
        return out


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_ground_truth_as_predictions_gives_ap_100(tmp_path, scale):
    ds = GtDataset(_write_coco(tmp_path), scale=scale)
    metrics, results = evaluate(OracleModel(ds), ds, progress=False, return_predictions=True)
    assert set(metrics) == {"bbox", "segm"}  # masks in the output → segm evaluated automatically
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        assert set(m) == set(METRIC_NAMES)
        for k in ("AP", "AP50", "AP75", "APm", "APl"):
            assert m[k] == pytest.approx(100.0), (iou_type, k, m)
        assert math.isnan(m["APs"])  # no small objects: COCO says -1, reported as NaN
    assert {r["category_id"] for r in results} == {3, 7}
    assert results[0]["bbox"] == pytest.approx([10, 10, 40, 40])  # back at the original size, COCO xywh
    table = format_metrics(metrics)
    assert "bbox" in table and "segm" in table and "100.00" in table


def test_no_detections_gives_zeros(tmp_path):
    ds = GtDataset(_write_coco(tmp_path))
    metrics = evaluate(OracleModel(ds, empty=True), ds, iou_types=["bbox", "segm"], progress=False)
    assert metrics == {t: {k: 0.0 for k in METRIC_NAMES} for t in ("bbox", "segm")}


def test_max_images_scores_only_the_evaluated_images(tmp_path):
    ds = GtDataset(_write_coco(tmp_path))
    metrics = evaluate(OracleModel(ds), ds, iou_types=["bbox"], max_images=1, progress=False)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)  # image 2 not predicted and not counted as missed


def test_dataset_without_coco_is_rejected():
    with pytest.raises(TypeError, match="no `.coco`"):
        evaluate(torch.nn.Identity(), [(torch.zeros(3, 4, 4), {})], progress=False)


def test_model_classes_are_matched_to_the_datasets_by_name():
    """Same names in another order (e.g. category ids renumbered) map by name; other classes are a clear error
    instead of an IndexError or silently wrong AP (issue: a 7-class checkpoint on 3-class data)."""
    from types import SimpleNamespace

    from onestage.engine.checkpoint import ClassMismatchError, class_mapping
    from onestage.engine.evaluate import _label_to_cat

    assert class_mapping(["a", "b", "c"], ["a", "b", "c"]) is None
    assert class_mapping(None, ["a"]) is None
    assert class_mapping(["a", "b", "c"], ["c", "a", "b"]) == [1, 2, 0]
    with pytest.raises(ClassMismatchError, match=r"trained on 2 classes \['a', 'b'\], the dataset has 3"):
        class_mapping(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ClassMismatchError):
        class_mapping(["a", "a", "b"], ["a", "b", "a"])  # duplicate names: ambiguous
    # the dataset's categories: ids 5, 7, 9 named c, a, b (labels 0, 1, 2 in id order)
    ds = SimpleNamespace(class_names=["c", "a", "b"], label_to_cat_id=[5, 7, 9], num_classes=3)
    model = SimpleNamespace(class_names=["a", "b", "c"], num_classes=3)
    to_cat = _label_to_cat(ds, model)
    assert [to_cat(i) for i in range(3)] == [7, 9, 5]  # a -> 7, b -> 9, c -> 5
    assert [_label_to_cat(ds)(i) for i in range(3)] == [5, 7, 9]  # no model: the dataset's own order
    with pytest.raises(ClassMismatchError, match="predicts 7 classes, the dataset has 3"):
        _label_to_cat(ds, SimpleNamespace(class_names=None, num_classes=7))
