"""onestage.analysis.solo_diagnostics: positive-cell category / mask quality and class-agnostic AP."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from onestage.analysis.solo_diagnostics import class_agnostic_ap, positive_cell_diagnostics
from onestage.modeling.parts import ForwardParts
from onestage.modeling.solo import SOLO, SOLOConfig, downsample_masks
from onestage.modeling.solov2 import SOLOv2, SOLOv2Config, SOLOv2HeadOutputs
from onestage.structures import masks_to_boxes


def _square(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y0:y1, x0:x1] = 1
    return m


class _TinyDataset:
    """Two 96×128 images with two squares each (classes 1 and 4)."""

    def __init__(self):
        self.items = []
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            masks = torch.stack([_square(96, 128, 8, 50, 10, 70), _square(96, 128, 55, 80, 80, 110)])
            self.items.append((torch.rand(3, 96, 128, generator=g),
                               dict(boxes=masks_to_boxes(masks), labels=torch.tensor([1, 4]), masks=masks)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _OracleSOLOv2(SOLOv2):
    """SOLOv2 whose heads are built from the ground truth: +10 logits for the object's class at its positive cells,
    −10 elsewhere; mask feature channel o = ±10 inside/outside object o, and each positive cell's kernel picks its
    object's channel (its ``forward_parts``, what the diagnostics read). Its diagnostics must be perfect."""

    def __init__(self, dataset):
        super().__init__(SOLOv2Config.preset("smoke"), num_classes=7)
        self.dataset = dataset
        self.current = None

    def forward_parts(self, images):
        batch, sizes = self.preprocess(images)
        target = next(t for im, t in self.dataset.items if im.shape[-2:] == self.current)
        canvas = batch.shape[-2:]
        assigned = self.assign([target], canvas)
        cate, kernels = [], []
        e = self.cfg.num_masks
        for lvl, s in enumerate(self.grid_numbers):
            logits = torch.full((1, self.num_classes, s * s), -10.0)
            kern = torch.zeros(1, e, s * s)
            cells, objects = assigned.cells[lvl], assigned.gt_inds[lvl]
            logits[0, target["labels"][objects], cells] = 10.0
            kern[0, objects, cells] = 1.0
            cate.append(logits.view(1, -1, s, s))
            kernels.append(kern.view(1, e, s, s))
        hw = (canvas[0] // 4, canvas[1] // 4)
        feats = torch.full((1, e, *hw), -10.0)
        gt = downsample_masks(target["masks"], canvas, hw)
        feats[0, : len(gt)] = gt * 20.0 - 10.0
        return ForwardParts(batch, [tuple(v) for v in sizes], {}, SOLOv2HeadOutputs(cate, kernels, feats),
                            mask_inputs={"mask_features": feats})

    def preprocess(self, images):
        self.current = images[0].shape[-2:]
        return super().preprocess(images)


def test_an_oracle_model_scores_perfectly():
    ds = _TinyDataset()
    report = positive_cell_diagnostics(_OracleSOLOv2(ds), ds)
    assert report["images"] == 2 and report["num_pairs"] > 0
    assert report["class_accuracy"] == 1.0
    assert report["gt_class_score"]["median"] > 0.999
    assert report["frac_gt_score_above"]["0.3"] == 1.0
    assert report["mask_iou"]["mean"] == pytest.approx(1.0)
    assert report["frac_mask_iou_above"]["0.75"] == 1.0


@pytest.mark.parametrize("build", [lambda: SOLO(SOLOConfig.preset("smoke"), num_classes=7),
                                   lambda: SOLOv2(SOLOv2Config.preset("smoke"), num_classes=7)],
                         ids=["solo", "solov2"])
def test_untrained_models_report_every_positive_pair_in_range(build):
    torch.manual_seed(0)
    model = build().train()
    ds = _TinyDataset()
    report = positive_cell_diagnostics(model, ds, max_images=1)
    assert model.training  # mode restored
    image, target = ds[0]
    batch, _ = model.preprocess([image])
    expected = sum(c.numel() for c in model.assign([target], batch.shape[-2:]).cells)
    assert report["num_pairs"] == expected > 0
    levels = report["per_level"]
    assert [lv["S"] for lv in levels] == list(model.grid_numbers)
    assert sum(lv["num_pairs"] for lv in levels) == expected
    assert [lv["num_pairs"] for lv in levels] == [c.numel() for c in model.assign([target], batch.shape[-2:]).cells]
    # the level's feature map: the 96×128 image padded to 96×128, divided by the level's stride (rounded up)
    assert [lv["feature_hw"] for lv in levels] == [[-(-96 // st), -(-128 // st)] for st in model.strides]
    # an untrained category branch sits at the focal prior (0.01) and is below the 0.1 threshold everywhere
    assert report["gt_class_score"]["median"] == pytest.approx(0.01, abs=0.01)
    assert report["frac_gt_score_above"]["0.1"] == 0.0
    assert 0.0 <= report["mask_iou"]["mean"] <= 1.0 and 0.0 <= report["class_accuracy"] <= 1.0


def test_positive_cell_diagnostics_rejects_other_models():
    from onestage.modeling.fcos import FCOS, FCOSConfig

    with pytest.raises(TypeError, match="SOLO or SOLOv2"):
        positive_cell_diagnostics(FCOS(FCOSConfig.preset("smoke"), num_classes=3), _TinyDataset())


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def test_class_agnostic_ap_by_hand():
    """Two objects with exact masks but swapped classes: per-class AP 0, class-agnostic AP 100."""
    from onestage.engine.evaluate import coco_eval

    a, b = _square(64, 64, 4, 30, 4, 30), _square(64, 64, 34, 60, 30, 60)
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 64, "width": 64}],
        "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(a), "area": float(a.sum()),
             "bbox": [4, 4, 26, 26], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": _rle(b), "area": float(b.sum()),
             "bbox": [30, 34, 30, 26], "iscrowd": 0},
        ],
    }
    gt.createIndex()
    results = [{"image_id": 1, "category_id": 2, "segmentation": _rle(a), "score": 0.9},
               {"image_id": 1, "category_id": 1, "segmentation": _rle(b), "score": 0.8}]
    assert coco_eval(gt, results, "segm", [1])["AP"] == pytest.approx(0.0)
    assert class_agnostic_ap(gt, results, [1]) == pytest.approx(100.0)
    assert len(gt.dataset["categories"]) == 2  # the ground truth is not modified


def test_mask_output_training_pairs_counts_the_pairs_each_mask_output_is_trained_by():
    """Vanilla: the pairs of cell k land on channel k of their level; Decoupled: on x-map j and y-map i; SOLOv2: all
    on its one shared output — checked against the assignment itself, per level, with hand-derived totals."""
    from onestage.analysis.solo_diagnostics import mask_output_training_pairs
    from onestage.modeling.solo import DecoupledSOLO

    data = _TinyDataset()
    vanilla = SOLO(SOLOConfig.preset("smoke"), num_classes=7)
    decoupled = DecoupledSOLO(dataclasses.replace(SOLOConfig.preset("smoke"), head="decoupled"), num_classes=7)
    v2 = SOLOv2(SOLOv2Config.preset("smoke"), num_classes=7)
    rv, rd, r2 = (mask_output_training_pairs(m, data) for m in (vanilla, decoupled, v2))
    grids = vanilla.grid_numbers
    expected = []  # per level: channel k → pairs, from the assignment
    for lvl, s in enumerate(grids):
        counts = torch.zeros(s * s, dtype=torch.long)
        for image, target in data:
            cells = vanilla.assign([target], vanilla.preprocess([image])[0].shape[-2:]).cells[lvl]
            counts += torch.bincount(cells % (s * s), minlength=s * s)
        expected.append(counts)
    total = int(sum(c.sum() for c in expected))
    assert total > 0 and rv["num_pairs"] == rd["num_pairs"] == total
    assert rv["num_outputs"] == sum(s * s for s in grids) and rd["num_outputs"] == sum(2 * s for s in grids)
    assert rv["pairs_per_output"]["mean"] == pytest.approx(total / rv["num_outputs"])
    assert rd["pairs_per_output"]["mean"] == pytest.approx(2 * total / rd["num_outputs"])  # each pair: an x and a y map
    trained = sum(int((c > 0).sum()) for c in expected)
    assert rv["pairs_per_output"]["frac_untrained"] == pytest.approx(1 - trained / rv["num_outputs"])
    for lvl, s in enumerate(grids):
        assert rv["per_level"][lvl]["pairs"] == int(expected[lvl].sum())
        assert rv["per_level"][lvl]["pairs_per_output_mean"] == pytest.approx(float(expected[lvl].float().mean()))
    # SOLOv2: one output, trained by every pair of its own assignment (all levels)
    total2 = sum(len(c) for image, target in data
                 for c in v2.assign([target], v2.preprocess([image])[0].shape[-2:]).cells)
    assert r2["num_outputs"] == 1 and r2["pairs_per_output"]["mean"] == r2["num_pairs"] == total2 > 0
    assert r2["pairs_per_output"]["frac_untrained"] == 0.0
    with pytest.raises(TypeError):
        mask_output_training_pairs(torch.nn.Linear(1, 1), data)


def test_training_pairs_command_writes_its_report(tmp_path):
    from onestage.analysis.solo_diagnostics import main

    out = tmp_path / "pairs.json"
    report = main(["--training-pairs", "solo,solov2", "--preset", "smoke", "--max-images", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert set(report["models"]) == {"solo", "solov2"} and report["models"]["solo"]["images"] == 2
    assert report["models"]["solo"]["head"] == "vanilla" and report["models"]["solov2"]["num_outputs"] == 1
