"""One function sizes the datasets of a training config (``onestage.data.dataset_for_config``), and every training
path uses it, so an override such as ``flip_prob=0`` reaches the dataset whichever way training starts."""
import pytest

import onestage.data
from onestage.config import get_train_config
from onestage.data import dataset_for_config, datasets_for_config
from onestage.data.synthetic import ensure_synthetic


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=3, num_val=2, image_size=64,
                            progress=False)["root"]
    return f"synthetic:{root}"


def test_train_split_takes_the_configs_sizes_flips_and_skips_empty_images(spec):
    cfg = get_train_config("smoke", flip_prob=0.0, min_size=(96, 112), max_size=128, test_min_size=80,
                           test_max_size=100)
    train, val = datasets_for_config(spec, cfg)
    assert train.train and train.flip_prob == 0.0 and tuple(train.min_size) == (96, 112) and train.max_size == 128
    assert not val.train and val.flip_prob == 0.0 and tuple(val.min_size) == (80,) and val.max_size == 100
    assert len(train) == 3 and len(val) == 2
    assert dataset_for_config(spec, "train", get_train_config("smoke")).flip_prob == 0.5
    # an evaluation view of the train split (train=False): test size, no flips
    view = dataset_for_config(spec, "train", cfg, train=False)
    assert not view.train and tuple(view.min_size) == (80,)


class _Reached(Exception):
    pass


@pytest.fixture
def recorded(monkeypatch):
    """Replace dataset_for_config by a recorder that stops the caller at its first dataset."""
    calls = []

    def record(spec, split, train_cfg, train=None, **kwargs):
        calls.append((split, train_cfg.flip_prob))
        raise _Reached

    monkeypatch.setattr(onestage.data, "dataset_for_config", record)
    return calls


def _paths(tmp_path):
    from onestage import bench_train
    from onestage.cli import main
    from onestage.engine.shipped import make_shipped_checkpoint
    from onestage.experiments.experiment import build_datasets

    yield "cli train", lambda: main(["train", "--model", "fcos", "--preset", "smoke", "--data", "synthetic",
                                     "--train-set", "flip_prob=0", "--out", str(tmp_path / "t")])
    yield "checkpoints", lambda: make_shipped_checkpoint("fcos", "synthetic", tmp_path / "o", tmp_path / "r",
                                                         preset="smoke", flip_prob=0.0)
    yield "reproduce (experiment notebook)", lambda: build_datasets("synthetic", get_train_config("smoke",
                                                                                                    flip_prob=0.0))
    yield "bench train", lambda: bench_train.time_training_step("fcos", "smoke", flip_prob=0.0)
    yield "bench regimes", lambda: bench_train.time_to_quality("fcos", "smoke", "bbox", 1.0, tmp_path / "q",
                                                               flip_prob=0.0)


def test_every_training_path_builds_its_datasets_with_dataset_for_config(recorded, tmp_path):
    for name, run in _paths(tmp_path):
        recorded.clear()
        with pytest.raises(_Reached):
            run()
        assert recorded == [("train", 0.0)], name


def test_a_box_only_model_keeps_boxes_whose_polygon_is_unusable(tmp_path):
    """FCOS trains on boxes; an annotation with a broken polygon but a good box is dropped only for mask models."""
    import json

    paths = ensure_synthetic(tmp_path / "syn", num_train=2, num_val=1, image_size=64, progress=False)
    coco = json.loads(open(paths["train_ann"]).read())
    first = coco["annotations"][0]
    first["segmentation"] = [[1.0, 1.0, 2.0, 2.0]]  # two points: no polygon
    ann = tmp_path / "broken.json"
    ann.write_text(json.dumps(coco))
    spec = f"coco:{ann}:{paths['train_images']}"
    cfg = get_train_config("smoke")
    n_boxes = sum(a["image_id"] == first["image_id"] for a in coco["annotations"])

    def boxes(model):
        ds = dataset_for_config(spec, "train", cfg, train=False, model=model)
        return len(ds[ds.ids.index(first["image_id"])][1]["boxes"])

    assert boxes("fcos") == n_boxes
    assert boxes("condinst") == n_boxes - 1
