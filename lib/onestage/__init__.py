"""onestage: anchor-free, fully convolutional detection and instance segmentation for teaching and analysis.

Public API (torchvision conventions, see docs/ARCHITECTURE.md)::

    import onestage
    model = onestage.build_model("fcos", preset="cpu", num_classes=6)
    losses = model(images, targets)          # train mode
    preds = model(images)                    # eval mode
    metrics = onestage.evaluate(model, dataset)
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["build_model", "evaluate", "load_model", "available_models", "__version__"]


def available_models() -> list[str]:
    from onestage.modeling import MODELS

    return sorted(MODELS)


def build_model(name: str, preset: str = "cpu", num_classes: int = 80, **overrides):
    """Build a model by name with a preset (``paper``, ``cpu``, ``smoke``) and keyword overrides of its config."""
    from onestage.modeling import build_model as _build

    return _build(name, preset=preset, num_classes=num_classes, **overrides)


def evaluate(model, dataset, **kwargs):
    """COCO evaluation (pycocotools) of ``model`` on ``dataset``; see :func:`onestage.engine.evaluate.evaluate`."""
    from onestage.engine.evaluate import evaluate as _evaluate

    return _evaluate(model, dataset, **kwargs)


def load_model(path, map_location="cpu"):
    """Rebuild a model from an onestage checkpoint file."""
    from onestage.engine.checkpoint import load_model as _load

    return _load(path, map_location=map_location)
