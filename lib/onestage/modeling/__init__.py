"""Models: a registry from name to (config class, model class)."""
from __future__ import annotations

import dataclasses


#: name → (module, config class, model class). Modules are imported on first use.
_MODEL_TABLE = {
    "fcos": ("onestage.modeling.fcos", "FCOSConfig", "FCOS"),
    "condinst": ("onestage.modeling.condinst", "CondInstConfig", "CondInst"),
    "blendmask": ("onestage.modeling.blendmask", "BlendMaskConfig", "BlendMask"),
    "solo": ("onestage.modeling.solo", "SOLOConfig", "SOLO"),
    "decoupled_solo": ("onestage.modeling.solo", "DecoupledSOLOConfig", "DecoupledSOLO"),
    "solov2": ("onestage.modeling.solov2", "SOLOv2Config", "SOLOv2"),
}


def _registry():
    import importlib

    out = {}
    for name, (module, cfg_name, model_name) in _MODEL_TABLE.items():
        mod = importlib.import_module(module)
        out[name] = (getattr(mod, cfg_name), getattr(mod, model_name))
    return out


class _LazyRegistry(dict):
    """Imports model files on first use so ``import onestage`` stays cheap."""

    def _load(self):
        if not dict.__len__(self):
            self.update(_registry())

    def __getitem__(self, key):
        self._load()
        return dict.__getitem__(self, key)

    def __contains__(self, key):
        self._load()
        return dict.__contains__(self, key)

    def __iter__(self):
        self._load()
        return dict.__iter__(self)

    def __len__(self):
        self._load()
        return dict.__len__(self)

    def keys(self):
        self._load()
        return dict.keys(self)

    def values(self):
        self._load()
        return dict.values(self)

    def items(self):
        self._load()
        return dict.items(self)

    def get(self, key, default=None):
        self._load()
        return dict.get(self, key, default)

    def __repr__(self):
        self._load()
        return dict.__repr__(self)


MODELS = _LazyRegistry()


#: Model presets defined for every model at once as (base preset, config overrides). ``fast``: the ``cpu`` preset with
#: the stem and the first stage of the body frozen — ``freeze_at=2``, the papers' own default (detectron2's
#: ``BACKBONE.FREEZE_AT``; the ``cpu`` preset trains everything) — capacity, not algorithm: every part the papers
#: ablate sits above the backbone. A frozen prefix's output can be cached (:mod:`onestage.modeling.feature_cache`),
#: which the ``fast`` training preset does.
DERIVED_PRESETS = {"fast": ("cpu", {"freeze_at": 2})}

#: The training size the ``fast`` model preset is made for (the ``fast`` training preset's 256 px).
FAST_TRAIN_SIZE = 256


def derived_model_overrides(preset: str, name: str) -> dict:
    """Per-model additions to a derived preset. The SOLO family's scale ranges are pixel sizes for the papers'
    800-px training images; the ``fast`` preset trains at :data:`FAST_TRAIN_SIZE` px, so its SOLO models scale them
    by 256 / 800 (:func:`onestage.modeling.solo.scaled_scale_ranges`): the same objects, relative to the image, per
    level as in the paper. Measured (SOLOv2, 300 fast iterations, seed 0): 15.6 mask AP scaled vs 11.8 with the
    800-px ranges (data/results/bench_train/README.md)."""
    if preset == "fast" and name in ("solo", "decoupled_solo", "solov2"):
        from onestage.modeling.solo import scaled_scale_ranges

        return {"scale_ranges": scaled_scale_ranges(FAST_TRAIN_SIZE)}
    return {}


def get_model_config(name: str, preset: str = "cpu", **overrides):
    """The config dataclass of model ``name`` at ``preset``, with keyword overrides (unknown names raise TypeError)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    cfg_cls, _ = MODELS[name]
    if preset in DERIVED_PRESETS:
        base, derived = DERIVED_PRESETS[preset]
        cfg = dataclasses.replace(cfg_cls.preset(base), **derived, **derived_model_overrides(preset, name))
    else:
        cfg = cfg_cls.preset(preset)
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {cfg_cls.__name__} option(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(cfg, **overrides)


def training_view(cfg) -> dict:
    """The part of a model config that decides training: ``dataclasses.asdict(cfg)`` without the fields the config
    class lists in ``INFERENCE_ONLY`` (thresholds, NMS kind, ...), with the values in ``TRAINS_AS`` mapped to the
    value they train as (FCOS ``centerness_on="computed"`` trains as ``"none"``). Two configs with the same view
    train the same weights from the same seed, so an ablation row that changes only inference can evaluate another
    row's trained weights (``onestage reproduce`` does: the row's record names them in ``weights_from``)."""
    view = dataclasses.asdict(cfg)
    for name in getattr(cfg, "INFERENCE_ONLY", ()):
        view.pop(name, None)
    for name, mapping in getattr(cfg, "TRAINS_AS", {}).items():
        if view.get(name) in mapping:
            view[name] = mapping[view[name]]
    return view


def build_model(name: str, preset: str = "cpu", num_classes: int = 80, **overrides):
    cfg = get_model_config(name, preset, **overrides)
    _, model_cls = MODELS[name]
    model = model_cls(cfg, num_classes=num_classes)
    model.name = name
    model.preset = preset
    return model
