"""A cache of the *frozen* leading stages of a backbone body, keyed by the exact pixels the body sees.

Why: every part these papers ablate (assignment, center-ness, dynamic heads, blender, grids, CoordConv, NMS) sits
above the backbone, and the papers train with the stem and the first residual stage frozen (detectron2's
``BACKBONE.FREEZE_AT: 2`` with FrozenBN, which the FCOS, CondInst, BlendMask and SOLO configs inherit). A frozen
stage's output is a pure function of its input, so computing it again for an image it has already seen is wasted
work — and on a 2-core CPU the stride-4 stem stage is about half of EfficientNet-Lite0's forward time.
:class:`BodyFeatureCache` remembers it; :meth:`onestage.modeling.backbone.Backbone.attach_feature_cache` puts it in
front of the trainable stages.

What makes it exact:

* **The key is the input itself**: a BLAKE2b digest of the bytes of one image's slice of the normalised, padded
  batch (plus its shape and dtype), the autocast dtype in force, and a fingerprint of the cached modules' weights.
  Image, scale, flip, colour jitter, padding — anything that changes a pixel changes the key, so the cache can never
  give a feature of another view; an augmentation that repeats (the same image at the same scale and flip) hits.
* **Only frozen modules are cached**: :meth:`BodyFeatureCache.check_frozen` refuses modules with a trainable
  parameter or a BatchNorm in training mode (their output would depend on the batch or change after each step). The
  weight fingerprint is recomputed whenever a parameter or buffer has been written in place (``load_state_dict``,
  ``copy_``: tensor version counters), so loading other weights never reads stale features.
* **Misses are computed together** (one sub-batch of the missing images), hits are read back as stored: bit-equal
  to what the frozen stages produced for that input. Against a plain forward of the whole batch the only possible
  difference is the order of floating-point sums that another batch size may give a convolution (the tests compare
  the losses).

Memory and disk: entries are kept in process memory up to ``max_memory_bytes`` and, with ``directory``, also written
(atomically: temporary file + rename) as one ``.pt`` file per entry under ``directory/<fingerprint>/``, so the runs of
an ablation table — separate processes — share one cache: the first run fills it, the others read it. Only the
outputs named in ``levels`` are stored (the Backbone keeps the last frozen stage's output, which the trainable stages
start from, and any frozen-stage output the FPN reads). EfficientNet-Lite0's stride-4 output (24 channels) at 256 px
is 384 KiB per view in fp32.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["BodyFeatureCache", "body_is_frozen"]


def body_is_frozen(body: nn.Module) -> bool:
    """True when ``body``'s output cannot change from one call to the next: no trainable parameter and no
    normalisation layer that updates running statistics or normalises over the batch in training mode."""
    if any(p.requires_grad for p in body.parameters()):
        return False
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in body.modules())


def _autocast_tag(device_type: str) -> str:
    if torch.is_autocast_enabled(device_type):
        return str(torch.get_autocast_dtype(device_type)).replace("torch.", "")
    return "fp32"


class BodyFeatureCache:
    """Remembers ``fn(x)`` per image for frozen modules; see the module docstring.

    ``levels``: the outputs of ``fn`` to keep (e.g. ``("res2",)``; ``None`` keeps all). ``directory``: an
    optional folder shared between processes. ``max_memory_bytes``: entries beyond it are not kept in memory (they
    are still written to ``directory``). ``stats`` counts ``hits`` (memory), ``disk_hits``, ``misses``.
    """

    def __init__(self, levels: Optional[Sequence[str]] = None, directory: Optional[os.PathLike] = None,
                 max_memory_bytes: int = 4 * 2**30):
        self.levels = tuple(levels) if levels is not None else None
        self.directory = Path(directory) if directory is not None else None
        self.max_memory_bytes = int(max_memory_bytes)
        self._memory: "OrderedDict[str, dict]" = OrderedDict()
        self._memory_bytes = 0
        self._fingerprint: Optional[str] = None
        self._versions: Optional[tuple] = None
        self.stats = {"hits": 0, "disk_hits": 0, "misses": 0}

    # ------------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def check_frozen(body: nn.Module) -> None:
        if not body_is_frozen(body):
            raise ValueError(
                "the feature cache needs frozen modules (no trainable parameter, no BatchNorm in training mode): "
                "build the model with freeze_at >= 2 (the 'fast' preset does), or turn cache_features off")

    def fingerprint(self, body: nn.Module) -> str:
        """Digest of the body's weights and buffers; recomputed only after one of them was written in place."""
        tensors = list(body.state_dict(keep_vars=True).items())
        versions = tuple(t._version for _, t in tensors)
        if self._fingerprint is None or versions != self._versions:
            h = hashlib.blake2b(digest_size=12)
            h.update(type(body).__name__.encode())
            for name, t in tensors:
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
                         if t.numel() else b"")
            self._fingerprint, self._versions = h.hexdigest(), versions
        return self._fingerprint

    @staticmethod
    def _key(x: Tensor, fingerprint: str, tag: str) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{fingerprint}|{tag}|{tuple(x.shape)}|{x.dtype}".encode())
        h.update(x.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _path(self, fingerprint: str, key: str) -> Optional[Path]:
        if self.directory is None:
            return None
        return self.directory / fingerprint / key[:2] / f"{key}.pt"

    def _remember(self, key: str, entry: dict) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if self._memory_bytes + size <= self.max_memory_bytes:
            self._memory[key] = entry
            self._memory_bytes += size

    def _lookup(self, key: str, path: Optional[Path]) -> Optional[dict]:
        entry = self._memory.get(key)
        if entry is not None:
            self.stats["hits"] += 1
            return entry
        if path is not None and path.is_file():
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a file another process left half-written cannot exist (atomic rename), but a
                return None    # corrupt disk can: recompute and overwrite it
            self.stats["disk_hits"] += 1
            self._remember(key, entry)
            return entry
        return None

    @staticmethod
    def _write(path: Path, entry: dict) -> None:
        # not engine.checkpoint.atomic_torch_save: processes writing the same entry at once need a temporary file
        # of their own (that one always writes path.tmp), and an entry that can be recomputed needs no fsync
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(entry, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    def __len__(self) -> int:
        return len(self._memory)

    # ---------------------------------------------------------------------------------------------------- use
    def __call__(self, body: nn.Module, fn: Callable[[Tensor], dict], x: Tensor) -> "OrderedDict[str, Tensor]":
        """``fn(x)`` for the batch ``x`` (B×3×H×W), reading the images seen before from the cache. ``body`` holds
        every module ``fn`` runs (checked to be frozen, and fingerprinted)."""
        self.check_frozen(body)
        fp = self.fingerprint(body)
        tag = _autocast_tag(x.device.type)
        keys = [self._key(x[i], fp, tag) for i in range(x.shape[0])]
        paths = [self._path(fp, k) for k in keys]
        entries = [self._lookup(k, p) for k, p in zip(keys, paths)]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            self.stats["misses"] += len(missing)
            with torch.no_grad():
                out = fn(x[missing])
            for j, i in enumerate(missing):
                entry = {name: f[j].detach().to("cpu").clone() for name, f in out.items()
                         if self.levels is None or name in self.levels}
                entries[i] = entry
                self._remember(keys[i], entry)
                if paths[i] is not None:
                    self._write(paths[i], entry)
        names = list(entries[0])
        return OrderedDict((n, torch.stack([e[n] for e in entries]).to(x.device)) for n in names)
