"""The synthetic generator: determinism, categories, occlusion, scale range, COCO validity, caching."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from onestage.data import get_dataset
from onestage.data.synthetic import CATEGORIES, ensure_synthetic, generate, render_image

SIZE = 128


def _digest(folder: Path) -> dict:
    """sha1 of every file under ``folder`` by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    paths = generate(out, num_train=20, num_val=4, image_size=SIZE, seed=0, progress=False, workers=1)
    return out, paths


def test_layout_and_categories(dataset):
    out, paths = dataset
    data = json.loads(Path(paths["train_ann"]).read_text())
    assert [c["id"] for c in data["categories"]] == list(range(1, len(CATEGORIES) + 1))
    names = [c["name"] for c in data["categories"]]
    assert len(names) >= 6 and {"ring", "crescent", "star", "blob"} <= set(names)
    assert len(data["images"]) == 20 and len(list(Path(paths["train_images"]).glob("*.png"))) == 20
    assert len(json.loads(Path(paths["val_ann"]).read_text())["images"]) == 4


def test_same_seed_same_bytes_regardless_of_workers(dataset, tmp_path):
    out, _ = dataset
    # the pool path only starts for >= 32 images per split: compare a 1-worker and a 2-worker run of 32
    a = generate(tmp_path / "a", num_train=32, num_val=0, image_size=64, seed=3, progress=False, workers=1)
    b = generate(tmp_path / "b", num_train=32, num_val=0, image_size=64, seed=3, progress=False, workers=2)
    assert _digest(Path(a["root"])) == _digest(Path(b["root"]))
    again = generate(tmp_path / "c", num_train=20, num_val=4, image_size=SIZE, seed=0, progress=False, workers=1)
    assert _digest(Path(again["root"])) == _digest(out)


def test_different_seed_differs(dataset, tmp_path):
    out, _ = dataset
    other = generate(tmp_path / "s1", num_train=20, num_val=4, image_size=SIZE, seed=1, progress=False, workers=1)
    da, db = _digest(out), _digest(Path(other["root"]))
    assert da.keys() == db.keys()
    assert sum(da[k] != db[k] for k in da) >= 20  # (almost) every file changes


def test_images_are_independent_of_each_other():
    """An image depends only on (seed, split, index): train 3 differs from val 3 and is stable."""
    a, _ = render_image(5, "train", 3, image_size=64)
    b, _ = render_image(5, "train", 3, image_size=64)
    c, _ = render_image(5, "val", 3, image_size=64)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_masks_decode_to_annotated_area_and_box(dataset):
    _, paths = dataset
    coco = COCO(paths["train_ann"])
    assert len(coco.anns) > 40
    for ann in coco.anns.values():
        m = coco.annToMask(ann)
        assert int(m.sum()) == ann["area"] == int(mask_utils.area(ann["segmentation"]))
        ys, xs = np.nonzero(m)
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert ann["iscrowd"] == 0 and ann["area"] >= 20


def test_visible_masks_do_not_overlap(dataset):
    _, paths = dataset
    coco = COCO(paths["train_ann"])
    for img_id in coco.imgs:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        if anns:
            stack = np.stack([coco.annToMask(a) for a in anns]).astype(np.int32)
            assert stack.sum(0).max() == 1, f"image {img_id}: annotations overlap"


def test_occluded_objects_are_dropped_or_reduced():
    """In crowded images many kept objects are partly hidden, and none is kept below the visibility thresholds."""
    shrunk = 0
    for i in range(4):
        _, objs = render_image(0, "train", i, image_size=SIZE, crowded=True)
        assert len(objs) >= 5
        for o in objs:
            assert o["mask"].sum() >= 20 and o["mask"].sum() >= 0.1 * o["painted_area"]
            shrunk += int(o["mask"].sum() < o["painted_area"])
    assert shrunk > 10


def test_fully_hidden_object_is_dropped(monkeypatch):
    """Force the second object to cover the first completely: only one annotation may remain."""
    import onestage.data.synthetic as syn

    calls = {"n": 0}

    def fake_shape(category, rng, scale):
        calls["n"] += 1
        side = 9 if calls["n"] == 1 else 61  # first a small square, then a big one over it
        return np.ones((side, side), dtype=bool)

    def fake_integers(orig):
        def integers(low, high=None, size=None, **kw):
            if high == 64 and size is None:  # object centres: put every object in the middle
                return 32
            if low == 3 and high == 9:  # object count
                return 2
            return orig(low, high, size, **kw)

        return integers

    real_rng = syn._image_rng

    def rng_with_fixed_layout(*args):
        rng = real_rng(*args)
        orig = rng.integers

        class Wrapped:
            def __getattr__(self, name):
                return getattr(rng, name)

            integers = staticmethod(fake_integers(orig))

        return Wrapped()

    monkeypatch.setattr(syn, "_shape_mask", fake_shape)
    monkeypatch.setattr(syn, "_image_rng", rng_with_fixed_layout)
    _, objs = syn.render_image(0, "train", 0, image_size=64)
    assert calls["n"] == 2
    assert len(objs) == 1 and objs[0]["mask"].sum() == objs[0]["painted_area"]


def test_sizes_span_small_to_large(tmp_path):
    paths = generate(tmp_path, num_train=24, num_val=0, image_size=320, seed=0, progress=False, workers=1)
    anns = json.loads(Path(paths["train_ann"]).read_text())["annotations"]
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in anns])
    assert sides.min() <= 16  # P3 (stride 8) objects
    assert sides.max() >= 256  # some object reaches the P6 range (max ltrb > 256 needs a box > 256)
    assert ((sides > 64) & (sides <= 128)).any() and ((sides > 128) & (sides <= 256)).any()
    cats = {a["category_id"] for a in anns}
    assert len(cats) == len(CATEGORIES)


def test_ring_has_a_hole():
    """A ring's mask is not simply connected: its centre pixel is outside the mask."""
    import onestage.data.synthetic as syn

    m = syn._shape_mask("ring", np.random.default_rng(0), 40.0)
    c = m.shape[0] // 2
    assert not m[c, c] and m.sum() > 100


def test_ensure_synthetic_reuses_and_regenerates(tmp_path):
    root = tmp_path / "syn"
    p1 = ensure_synthetic(root, num_train=3, num_val=1, image_size=64, progress=False, workers=1)
    stamp = Path(p1["train_ann"]).stat().st_mtime_ns
    p2 = ensure_synthetic(root, num_train=3, num_val=1, image_size=64, progress=False, workers=1)
    assert p2 == p1 and Path(p2["train_ann"]).stat().st_mtime_ns == stamp  # reused, not rewritten
    ensure_synthetic(root, num_train=5, num_val=1, image_size=64, progress=False, workers=1)
    assert len(json.loads(Path(p1["train_ann"]).read_text())["images"]) == 5  # parameters changed: regenerated
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]  # no temporary folder left behind
    ds = get_dataset(f"synthetic:{root}", split="val", num_train=5, num_val=1, image_size=64, progress=False,
                     workers=1, min_size=(64,), max_size=64)
    assert len(ds) == 1 and ds.num_classes == len(CATEGORIES)


def test_get_dataset_reuses_an_existing_build_without_parameters(tmp_path):
    """A folder made with non-default parameters is used as-is when the caller asks for none (no regeneration)."""
    root = tmp_path / "custom"
    ensure_synthetic(root, num_train=2, num_val=1, image_size=48, seed=4, progress=False, workers=1)
    ds = get_dataset(f"synthetic:{root}", split="train", min_size=None)
    assert len(ds) == 2 and ds[0][0].shape == (3, 48, 48)
    ds = get_dataset("synthetic", split="val", root=tmp_path / "fresh", num_train=2, num_val=2, image_size=48,
                     progress=False, workers=1, min_size=None)
    assert len(ds) == 2 and (tmp_path / "fresh" / "synthetic" / "manifest.json").is_file()
