"""The fast CPU training paths (issue: learn fast enough on 2 cores): the frozen-prefix feature cache, bf16
autocast on CPU, the ``fast`` presets, the on_step hook, and the training benchmarks. Each fast path is compared
with the plain path on a fixed batch; speed itself is only measured (``python -m onestage bench train``)."""
import copy
import json

import pytest
import torch

import onestage
from onestage.config import TRAIN_PRESETS, get_train_config
from onestage.engine.train import autocast_policy, cpu_has_native_bf16, train
from onestage.modeling import get_model_config
from onestage.modeling.backbone import frozen_prefix_stages, run_stages


def _target(boxes, labels, hw):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    masks = torch.zeros(len(boxes), *hw, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
        m[y0:y1, x0:x1] = 1
    return {"boxes": boxes, "labels": torch.tensor(labels), "masks": masks}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 96, 128, generator=g)]
    targets = [_target([[10.0, 12.0, 70.0, 90.0], [60.0, 20.0, 120.0, 80.0]], [0, 2], (96, 128)),
               _target([[5.0, 5.0, 40.0, 30.0]], [1], (96, 128))]
    return images, targets


def _model(name="fcos", freeze_at=2, **kw):
    torch.manual_seed(0)
    return onestage.build_model(name, preset="smoke", num_classes=3, freeze_at=freeze_at, **kw).train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------- presets
def test_fast_presets_freeze_the_papers_prefix_and_turn_the_levers_on():
    for name in ("fcos", "condinst", "blendmask", "solo", "decoupled_solo", "solov2"):
        fast, cpu = get_model_config(name, "fast"), get_model_config(name, "cpu")
        assert fast.freeze_at == 2 and cpu.freeze_at == 0  # detectron2's FREEZE_AT default, the papers' setting
        # nothing else differs from the cpu preset but SOLO's scale ranges, scaled to the 256-px training size
        same = {"freeze_at", "scale_ranges"}
        assert {k: v for k, v in vars(fast).items() if k not in same} == \
            {k: v for k, v in vars(cpu).items() if k not in same}
    cfg = get_train_config("fast")
    assert cfg.cache_features and cfg.amp_cpu and cfg.time_budget_s is None
    assert "fast" in TRAIN_PRESETS


def test_run_stages_is_the_body_forward_and_can_continue_from_a_prefix():
    model = _model(freeze_at=0)
    body = model.backbone.body
    x = torch.randn(2, 3, 64, 96)
    full = body(x)
    assert list(full) == ["res2", "res3", "res4", "res5"]
    prefix = run_stages(body, x, 0, 2)
    assert list(prefix) == ["res2", "res3"]
    rest = run_stages(body, prefix, 2)
    for k in full:
        torch.testing.assert_close(rest[k], full[k], rtol=0, atol=0)


@pytest.mark.parametrize("freeze_at, expected", [(0, 0), (1, 0), (2, 1), (3, 2), (4, 3), (5, 4)])
def test_frozen_prefix_counts_whole_frozen_stages(freeze_at, expected):
    assert frozen_prefix_stages(_model(freeze_at=freeze_at).backbone.body) == expected


def test_frozen_prefix_of_efficientnet_lite0_matches_freeze_at():
    model = onestage.build_model("fcos", preset="fast", num_classes=3)
    assert frozen_prefix_stages(model.backbone.body) == 1


# ----------------------------------------------------------------------------------------- feature cache
@pytest.mark.parametrize("name", ["fcos", "condinst", "solov2"])
@pytest.mark.parametrize("freeze_at", [2, 5])
def test_cached_features_give_the_plain_losses_and_gradients(name, freeze_at):
    """fp32: the first (miss) and the second (hit) cached pass equal the plain pass to the bit on this CPU."""
    images, targets = _batch()
    model = _model(name, freeze_at)
    plain_model = copy.deepcopy(model)
    plain = plain_model(images, targets)
    sum(plain.values()).backward()
    cache = model.backbone.attach_feature_cache()
    for attempt in range(2):
        model.zero_grad(set_to_none=True)
        cached = model(images, targets)
        sum(cached.values()).backward()
        for k in plain:
            torch.testing.assert_close(cached[k], plain[k], rtol=1e-6, atol=1e-7, msg=f"{k} pass {attempt}")
        ga, gb = _grads(plain_model), _grads(model)
        assert set(ga) == set(gb)
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-7, msg=n)
    assert cache.stats == {"hits": 2, "disk_hits": 0, "misses": 2}
    # the trainable stages are not cached: their parameters receive gradients, the frozen ones none
    assert not any(n.startswith("backbone.body.layer1") for n in ga)
    assert any(n.startswith("backbone.body.layer3") for n in ga) == (freeze_at <= 3)


def test_cache_keys_on_the_pixels_flip_and_size():
    model = _model()
    cache = model.backbone.attach_feature_cache()
    images, targets = _batch()
    model.eval()
    with torch.no_grad():
        model(images)
        model([im.flip(-1) for im in images])  # a flipped view is another input
        model([images[0][:, :64, :64]])         # so is another size
        model(images)
    assert cache.stats["misses"] == 5 and cache.stats["hits"] == 2


def test_cache_refuses_a_trainable_body_and_notices_new_weights():
    with pytest.raises(ValueError, match="freeze_at >= 2"):
        _model(freeze_at=0).backbone.attach_feature_cache()
    model = _model().eval()
    cache = model.backbone.attach_feature_cache()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.backbone(x)
        # other weights in the frozen prefix (as load_state_dict would write them): the cache must not serve old ones
        model.backbone.body.conv1.weight.mul_(0.5)
        after = model.backbone(x)
        model.backbone.detach_feature_cache()
        ref = model.backbone(x)
    assert cache.stats == {"hits": 0, "disk_hits": 0, "misses": 4}
    for k in ref:
        torch.testing.assert_close(after[k], ref[k], rtol=0, atol=0)
        assert not torch.equal(before[k], after[k])


def test_disk_cache_is_shared_between_caches_and_written_atomically(tmp_path):
    images, targets = _batch()
    a, b = _model(), _model()
    ca = a.backbone.attach_feature_cache(tmp_path / "cache")
    la = a(images, targets)
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 2 and not list((tmp_path / "cache").rglob(".tmp-*"))
    cb = b.backbone.attach_feature_cache(tmp_path / "cache")
    lb = b(images, targets)
    assert ca.stats["misses"] == 2 and cb.stats == {"hits": 0, "disk_hits": 2, "misses": 0}
    for k in la:
        assert torch.equal(la[k], lb[k])
    # a corrupt entry is recomputed (and rewritten), not read
    files[0].write_bytes(b"not a tensor file")
    c = _model()
    cc = c.backbone.attach_feature_cache(tmp_path / "cache")
    lc = c(images, targets)
    assert cc.stats == {"hits": 0, "disk_hits": 1, "misses": 1}
    for k in la:
        assert torch.equal(la[k], lc[k])
    torch.load(files[0], weights_only=True)


def test_memory_limit_keeps_entries_on_disk_only(tmp_path):
    model = _model()
    cache = model.backbone.attach_feature_cache(tmp_path, max_memory_bytes=0)
    images, targets = _batch()
    model(images, targets)
    model(images, targets)
    assert len(cache) == 0 and cache.memory_bytes == 0 and cache.stats["disk_hits"] == 2


# ---------------------------------------------------------------------------------------------- autocast
def test_autocast_policy_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    cfg = get_train_config("fast")
    assert autocast_policy(cfg.replace(amp_cpu=False), "cpu") == (False, torch.float32)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu_has_native_bf16()
    assert autocast_policy(cfg, "cpu") == (False, torch.float32)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert autocast_policy(cfg, "cpu") == (True, torch.bfloat16)


@pytest.mark.parametrize("name", ["fcos", "condinst", "blendmask", "solov2"])
def test_bf16_autocast_losses_match_fp32_within_tolerance(name):
    """bf16 has an 8-bit mantissa: the losses of the same batch agree to a few per cent (stated tolerance 3 %)."""
    images, targets = _batch()
    model = _model(name, freeze_at=2)
    ref = model(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images, targets)
    for k in ref:
        assert torch.isfinite(low[k])
        lo, hi = float(low[k].detach()), float(ref[k].detach())
        assert abs(lo - hi) <= 0.03 * abs(hi) + 1e-3, (k, lo, hi)


# ------------------------------------------------------------------------------------------ the train loop
def _tiny_synthetic(tmp_path):
    from onestage.data.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path / "syn", num_train=6, num_val=2, image_size=96, progress=False)["root"]


def _train_fast(tmp_path, root, out, max_iters, resume=False, **kw):
    from onestage.data import get_dataset

    cfg = get_train_config("smoke", max_iters=6, checkpoint_every=2, num_workers=0, cache_features=True,
                           min_size=(96,), max_size=96, **kw)
    ds = get_dataset(f"synthetic:{root}", split="train", train=True, min_size=cfg.min_size, max_size=cfg.max_size)
    torch.manual_seed(0)
    model = onestage.build_model("fcos", preset="smoke", num_classes=ds.num_classes, freeze_at=2)
    if max_iters < cfg.max_iters:  # stop early through on_step, as an interruption would
        return train(model, ds, cfg, out, resume=resume, progress=False,
                     on_step=lambda it, m, t: it >= max_iters), model
    return train(model, ds, cfg, out, resume=resume, progress=False), model


def test_train_with_feature_cache_resumes_to_the_same_weights(tmp_path):
    root = _tiny_synthetic(tmp_path)
    straight, m1 = _train_fast(tmp_path, root, tmp_path / "a", 6)
    assert straight["feature_cache"]["misses"] >= 6 and straight["stopped"] == "max_iters"
    first, _ = _train_fast(tmp_path, root, tmp_path / "b", 3)
    assert first["stopped"] == "on_step" and first["iterations"] == 3
    # resume: last.pt holds iteration 3 (written on the on_step stop); the fresh process-level cache recomputes
    resumed, m2 = _train_fast(tmp_path, root, tmp_path / "b", 6, resume=True)
    assert resumed["iterations"] == 6
    s1, s2 = m1.state_dict(), m2.state_dict()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert m1.backbone.feature_cache is None  # train() detaches its cache


def test_on_step_sees_every_iteration_and_the_training_time(tmp_path):
    from onestage.engine.toy import ToyConfig, ToyDataset, ToyDetector

    seen = []
    torch.manual_seed(0)
    cfg = get_train_config("smoke", max_iters=5, num_workers=0)
    out = train(ToyDetector(ToyConfig()), ToyDataset(n=6), cfg, tmp_path, progress=False,
                on_step=lambda it, m, t: seen.append((it, m.training, t)))
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5] and all(s[1] for s in seen)
    assert all(b[2] >= a[2] > 0 for a, b in zip(seen, seen[1:])) and out["stopped"] == "max_iters"


# ------------------------------------------------------------------------------------------- benchmarks
def test_bench_train_splits_a_step_into_its_parts(tmp_path):
    from onestage.bench_train import format_training_steps, time_training_step

    root = _tiny_synthetic(tmp_path)
    for preset, over, cache in (("smoke", {}, False), ("smoke", {"freeze_at": 2}, True)):
        r = time_training_step("condinst", preset, threads=1, steps=1, warmup=1, data=f"synthetic:{root}",
                               model_overrides=over, cache_features=cache)
        s = r["seconds"]
        assert r["feature_cache"] is cache and r["threads"] == 1 and r["body_trains"]
        assert all(v >= 0 for v in s.values())
        assert s["step"] == pytest.approx(s["data"] + s["forward"] + s["backward"] + s["optimizer"], rel=1e-6)
        assert s["fwd_backbone_body"] + s["fwd_backbone_fpn"] + s["fwd_heads"] + s["fwd_loss"] == \
            pytest.approx(s["forward"], rel=1e-6)
        assert s["fwd_heads"] > 0 and s["bwd_heads"] > 0 and s["bwd_backbone_body"] > 0
    assert "| condinst | smoke | 1 | fp32 | yes |" in format_training_steps([r])


def test_time_to_quality_stops_at_the_target_and_records_the_curve(tmp_path):
    from onestage.bench_train import time_to_quality

    root = _tiny_synthetic(tmp_path)
    r = time_to_quality("fcos", "smoke", "bbox", -1.0, tmp_path / "run", max_iters=4, eval_every=2,
                        data=f"synthetic:{root}", progress=False, num_workers=0)
    assert r["reached"]["iter"] == 2 and r["iterations"] == 2 and len(r["curve"]) == 1
    assert r["reached"]["train_time_s"] > 0 and "bbox_AP" in r["reached"]
    never = time_to_quality("fcos", "smoke", "bbox", 101.0, tmp_path / "run2", max_iters=4, eval_every=2,
                            data=f"synthetic:{root}", progress=False, num_workers=0)
    assert never["reached"] is None and [c["iter"] for c in never["curve"]] == [2, 4]
    json.dumps(never)  # the record is JSON


def test_bench_train_and_regimes_refuse_unknown_presets(capsys):
    from onestage.cli import main

    assert main(["bench", "train", "--models", "fcos", "--train-presets", "nope"]) == 2
    assert "unknown training preset(s) ['nope']" in capsys.readouterr().err
    assert main(["bench", "regimes", "--models", "fcos", "--train-presets", "cpu", "nope:warm"]) == 2
    assert "unknown training preset(s) ['nope:warm']" in capsys.readouterr().err
