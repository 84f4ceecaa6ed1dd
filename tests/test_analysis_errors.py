"""Error analysis (onestage.analysis.errors): hand-built cases where each TIDE error type is known, and random
predictions compared with the paper's reference implementation (tidecv, ΔAP within 0.1) and faster-coco-eval's
confusion matrix; PR curves against COCOeval's own AP."""
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from onestage.analysis.errors import ERROR_TYPES, analyze, confusion_matrix, error_breakdown, pr_curves, worst_images

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]


def _gt(images, anns):
    ann_list = []
    for k, (img, cat, box, *crowd) in enumerate(anns, start=1):
        x, y, w, h = box
        ann_list.append({"id": k, "image_id": img, "category_id": cat, "bbox": list(box), "area": w * h,
                         "iscrowd": int(bool(crowd and crowd[0])),
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    return {"images": [{"id": i, "width": 400, "height": 400, "file_name": f"{i}.png"} for i in images],
            "annotations": ann_list, "categories": CATS}


def _coco(data):
    coco = COCO()
    coco.dataset = json.loads(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": list(map(float, box)), "score": float(score)}


def _with_masks(dets, size=400):
    from pycocotools import mask as mask_utils

    out = []
    for d in dets:
        m = np.zeros((size, size), dtype=np.uint8)
        x, y, w, h = (int(round(v)) for v in d["bbox"])
        m[max(y, 0):y + h, max(x, 0):x + w] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        out.append({**d, "segmentation": rle})
    return out


# One image with one error of every type: g1 found twice (dupe), g2 found badly (loc), g3 found as the wrong class
# (cls), a box on nothing (bkg), a class-b box half on g2 (both), g4 not found at all (miss).
HAND_GT = _gt([1], [(1, 1, (0, 0, 20, 20)), (1, 1, (100, 100, 20, 20)), (1, 2, (200, 200, 20, 20)),
                    (1, 1, (300, 300, 20, 20))])
HAND_DETS = [_det(1, 1, (0, 0, 20, 20), 0.9), _det(1, 1, (1, 1, 20, 20), 0.8), _det(1, 1, (110, 110, 20, 20), 0.7),
             _det(1, 1, (200, 200, 20, 20), 0.6), _det(1, 1, (350, 20, 20, 20), 0.5), _det(1, 2, (108, 92, 20, 20), 0.4)]


def test_each_error_type_is_found_where_it_was_put():
    br = error_breakdown(_coco(HAND_GT), HAND_DETS)
    assert [d["type"] for d in sorted(br.detections, key=lambda d: d["index"])] == \
        ["tp", "dupe", "loc", "cls", "bkg", "both"]
    assert br.counts == {t: 1 for t in ERROR_TYPES}
    assert [m["gt_id"] for m in br.missed] == [4] and br.false_negatives == 3  # g2, g3 (fixable) and g4
    s = br.summary()
    assert s["false_positives"] == 5 and s["num_gt"] == 4 and s["num_detections"] == 6
    # class a: TP at rank 1 of 3 objects, then 4 FPs: AP = 1/3 of the recall axis at precision 1 (34 of 101 points)
    assert br.ap == pytest.approx((34 / 101 * 100 + 0.0) / 2)  # class b: one object, its one detection is a cls error
    # by hand (101 recall points r = 0, .01, ..., 1; AP of class a then the mean with class b):
    # loc: det 3 becomes g2's true positive at rank 3: precision 1 up to r = 1/3 (34 points), 2/3 up to r = 2/3
    # (33 points); cls: det 4 becomes class b's only detection, a true positive: class b AP 100; miss: g4 leaves the
    # ground truth, so the one TP is recall 1/2 (51 points); dupe, bkg, both: FPs after the last TP or on a class
    # whose object nobody found: nothing changes.
    a = 34 / 101 * 100
    assert br.delta_ap["loc"] == pytest.approx(((34 + 33 * 2 / 3) / 101 * 100) / 2 - a / 2)
    assert br.delta_ap["cls"] == pytest.approx((a + 100) / 2 - a / 2)
    assert br.delta_ap["miss"] == pytest.approx(51 / 101 * 100 / 2 - a / 2)
    assert br.delta_ap["dupe"] == br.delta_ap["bkg"] == br.delta_ap["both"] == 0.0
    # FN: every unfound object (g2, g3, g4) leaves the ground truth: class a reaches recall 1 at precision 1; class
    # b keeps its one (false) detection and no object: AP 0, still averaged
    assert br.fn_delta_ap == pytest.approx(100 / 2 - a / 2)
    assert worst_images(br, 1) == [(1, {"fp": 5, "dupe": 1, "loc": 1, "cls": 1, "bkg": 1, "both": 1, "miss": 1})]


def test_crowd_regions_and_images_without_objects():
    gt = _gt([1, 2], [(1, 1, (0, 0, 50, 50), True), (1, 1, (200, 200, 20, 20))])
    dets = [_det(1, 1, (2, 2, 40, 40), 0.9), _det(2, 1, (10, 10, 20, 20), 0.8), _det(1, 1, (200, 200, 20, 20), 0.7)]
    br = error_breakdown(_coco(gt), dets)
    types = {d["index"]: (d["type"], d["ignored"]) for d in br.detections}
    assert types[0] == ("bkg", True)  # inside the crowd region: ignored for AP, still named
    assert types[1] == ("bkg", False) and types[2] == ("tp", False)
    # the ignored detection is out of the ranking; the one on the empty image (0.8) ranks above the TP (0.7)
    assert br.ap == pytest.approx(50.0)
    assert br.delta_ap["bkg"] == pytest.approx(50.0)


def _random_case(seed, n_images=25):
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for img in range(1, n_images + 1):
        for _ in range(rng.integers(0, 6)):
            w, h = rng.uniform(8, 120, 2)
            x, y = rng.uniform(0, 400 - w), rng.uniform(0, 400 - h)
            cat = int(rng.choice([1, 2, 5]))
            crowd = bool(rng.random() < 0.05)
            anns.append((img, cat, (round(x, 1), round(y, 1), round(w, 1), round(h, 1)), crowd))
            if rng.random() < 0.8:  # found, more or less well, maybe as another class, maybe twice
                for _ in range(1 + int(rng.random() < 0.25)):
                    jit = rng.normal(0, rng.choice([0.03, 0.3]), 4) * [w, h, w, h]
                    c = cat if rng.random() > 0.15 else int(rng.choice([1, 2, 5]))
                    dets.append(_det(img, c, (x + jit[0], y + jit[1], max(w + jit[2], 2), max(h + jit[3], 2)),
                                     rng.random()))
        for _ in range(rng.integers(0, 4)):  # on nothing
            w, h = rng.uniform(8, 80, 2)
            dets.append(_det(img, int(rng.choice([1, 2, 5])), (*rng.uniform(0, 300, 2), w, h), rng.random()))
    return _gt(range(1, n_images + 1), anns), dets


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_ap_agrees_with_tidecv(tmp_path, seed, iou_type):
    tidecv = pytest.importorskip("tidecv", reason="the oracle: pip install -e '.[oracles]'")
    gt, dets = _random_case(seed)
    if iou_type == "segm":
        dets = _with_masks(dets)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    tide = tidecv.TIDE()
    run = tide.evaluate(tidecv.datasets.COCO(str(tmp_path / "gt.json")),
                        tidecv.datasets.COCOResult(str(tmp_path / "dt.json")),
                        mode=tidecv.TIDE.BOX if iou_type == "bbox" else tidecv.TIDE.MASK, name="run")
    main = tide.get_main_errors()["run"]
    special = tide.get_special_errors()["run"]
    counts = {e.short_name: n for e, n in run.count_errors().items()}

    br = error_breakdown(str(tmp_path / "gt.json"), str(tmp_path / "dt.json"), iou_type)
    names = {"cls": "Cls", "loc": "Loc", "both": "Both", "dupe": "Dupe", "bkg": "Bkg", "miss": "Miss"}
    assert br.ap == pytest.approx(run.ap, abs=0.1)
    for ours, theirs in names.items():
        assert br.delta_ap[ours] == pytest.approx(main[theirs], abs=0.1), ours
        assert br.counts[ours] == counts[theirs], ours
    assert br.fp_delta_ap == pytest.approx(special["FalsePos"], abs=0.1)
    assert br.fn_delta_ap == pytest.approx(special["FalseNeg"], abs=0.1)
    assert sum(br.counts.values()) > 20 and sum(br.counts[t] > 0 for t in ERROR_TYPES) >= 5  # (seed 2: no cls)


@pytest.mark.parametrize("seed", [0, 3])
def test_confusion_matrix_agrees_with_faster_coco_eval(tmp_path, seed):
    fce = pytest.importorskip("faster_coco_eval", reason="the oracle: pip install -e '.[oracles]'")
    from faster_coco_eval.extra import PreviewResults

    gt, dets = _random_case(seed)
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    M, names = confusion_matrix(_coco(gt), dets, iou_thresh=0.5, score_thresh=0.3)
    assert names == ["a", "b", "c", "background"]
    with contextlib.redirect_stdout(io.StringIO()):
        cg = fce.COCO(str(tmp_path / "gt.json"))
        cd = cg.loadRes(json.loads(json.dumps(dets)))
    theirs = PreviewResults(cg, cd, iouType="bbox", iou_tresh=0.5, min_score=0.3, useCats=False)
    cm = theirs.compute_confusion_matrix()  # K × (K + 2): true × predicted, then FP (by predicted class), FN
    K = len(CATS)
    np.testing.assert_array_equal(M[:K, :K], cm[:, :K])
    np.testing.assert_array_equal(M[K, :K], cm[:, K])  # detections on nothing, per predicted class
    np.testing.assert_array_equal(M[:K, K], cm[:, K + 1])  # objects nothing found
    assert M[K, K] == 0 and M.sum() > 0


def test_pr_curves_integrate_to_cocoeval_ap():
    gt, dets = _random_case(4)
    coco = _coco(gt)
    curves = pr_curves(coco, dets)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(dets))), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert curves["ap"]["AP"] == pytest.approx(ev.stats[0] * 100, abs=1e-6)
    assert curves["ap"]["by_iou"]["0.50"] == pytest.approx(ev.stats[1] * 100, abs=1e-6)
    assert len(curves["recall"]) == 101 and set(curves["by_class"]) == {"a", "b", "c"}
    assert all(np.all(np.diff(c) <= 1e-12) for c in curves["by_iou"].values())  # an envelope: never rises


def test_analyze_is_json_able_and_covers_masks_when_present():
    gt, dets = _random_case(5)
    out = analyze(_coco(gt), _with_masks(dets))
    assert set(out) == {"bbox", "segm"}
    json.dumps(out)
    assert set(out["bbox"]["errors"]["delta_ap"]) == set(ERROR_TYPES)
    assert set(analyze(_coco(gt), dets)) == {"bbox"}


def test_one_image_outcomes_from_tensors_match_the_breakdown():
    """What the prediction explorer colours by: the hand-made image, as a model's output and a dataset target."""
    import torch

    from onestage.analysis.errors import image_error_types

    coco = _coco(HAND_GT)
    xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
    cat = {1: 0, 2: 1}
    target = {"boxes": torch.tensor([xyxy(a["bbox"]) for a in coco.dataset["annotations"]]),
              "labels": torch.tensor([cat[a["category_id"]] for a in coco.dataset["annotations"]])}
    dets = {"boxes": torch.tensor([xyxy(d["bbox"]) for d in HAND_DETS]),
            "labels": torch.tensor([cat[d["category_id"]] for d in HAND_DETS]),
            "scores": torch.tensor([d["score"] for d in HAND_DETS])}
    types, missed = image_error_types(target, dets)
    assert types == ["tp", "dupe", "loc", "cls", "bkg", "both"] and missed == [3]
    masks = torch.zeros(4, 400, 400, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(target["boxes"].int().tolist()):
        masks[k, y0:y1, x0:x1] = True
    dmasks = torch.zeros(6, 400, 400)
    for k, (x0, y0, x1, y1) in enumerate(dets["boxes"].int().tolist()):
        dmasks[k, y0:y1, x0:x1] = 1.0
    types, missed = image_error_types({**target, "masks": masks}, {**dets, "masks": dmasks}, "segm")
    assert types == ["tp", "dupe", "loc", "cls", "bkg", "both"] and missed == [3]
