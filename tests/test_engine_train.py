"""Training loop: exact resume after SIGKILL, non-finite loss handling, time budget, Ctrl-C, data order."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from onestage.config import get_train_config
from onestage.engine.checkpoint import load_checkpoint
from onestage.engine.toy import ToyConfig, ToyDataset, ToyDetector
from onestage.engine.train import InfiniteBatchSampler, NonFiniteLossError, read_metrics, train


class SlowToyDataset(ToyDataset):
    def __init__(self, delay=0.0, interrupt_at=None, **kw):
        super().__init__(**kw)
        self.delay, self.interrupt_at, self.calls = delay, interrupt_at, 0

    def __getitem__(self, idx):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        time.sleep(self.delay)
        return super().__getitem__(idx)


def _model(**kw):
    torch.manual_seed(0)
    return ToyDetector(ToyConfig(**kw))


def _cfg(**kw):
    return get_train_config("smoke", **{"max_iters": 12, "checkpoint_every": 3, "num_workers": 0, **kw})


RESUME_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from onestage.config import get_train_config
    from onestage.engine.toy import ToyConfig, ToyDataset, ToyDetector
    from onestage.engine.train import train

    class Slow(ToyDataset):
        def __getitem__(self, i):
            time.sleep(0.15)
            return super().__getitem__(i)

    torch.set_num_threads(int(sys.argv[2]))  # the parent's: reductions must split the same way to be bit-exact
    torch.manual_seed(0)
    cfg = get_train_config("smoke", max_iters=12, checkpoint_every=3, num_workers=0)
    train(ToyDetector(ToyConfig()), Slow(n=10), cfg, sys.argv[1], progress=False)
""")


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    ref = _model()
    train(ref, ToyDataset(n=10), _cfg(), tmp_path / "ref", progress=False)

    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(torch.get_num_threads())])
    try:
        deadline = time.time() + 60
        while not (out / "last.pt").exists():
            assert proc.poll() is None, "training process ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = load_checkpoint(out / "last.pt")["iteration"]
    assert 0 < killed_at < 12 and not (out / "final.pt").exists()

    resumed = _model()
    summary = train(resumed, ToyDataset(n=10), _cfg(), out, resume=True, progress=False)
    assert summary["iterations"] == 12 and summary["stopped"] == "max_iters"
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"  # CPU, num_workers=0: bit-exact
    # the log has each iteration once, with the losses of the uninterrupted run (same batches, same flips)
    ref_log, res_log = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["iter"] for r in res_log] == list(range(1, 13))
    assert [r["loss"] for r in res_log] == [r["loss"] for r in ref_log]


def test_resume_refuses_missing_and_overwrite(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(_model(), ToyDataset(), _cfg(), tmp_path, resume=True, progress=False)
    train(_model(), ToyDataset(), _cfg(max_iters=2), tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(_model(), ToyDataset(), _cfg(max_iters=2), tmp_path, progress=False)


def test_non_finite_loss_raises_and_keeps_last_checkpoint(tmp_path):
    train(_model(), ToyDataset(), _cfg(max_iters=4, checkpoint_every=2), tmp_path, progress=False)
    good = (tmp_path / "last.pt").read_bytes()
    bad = _model(loss_scale=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"iteration 5: \['loss_cls', 'loss_box', 'loss'\]") as err:
        train(bad, ToyDataset(), _cfg(max_iters=8, checkpoint_every=1), tmp_path, resume=True, progress=False)
    assert err.value.iteration == 5 and math.isnan(err.value.losses["loss_cls"])
    assert "last good checkpoint" in str(err.value)
    assert (tmp_path / "last.pt").read_bytes() == good
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_time_budget_stops_and_accumulates_across_resume(tmp_path):
    data = SlowToyDataset(delay=0.02)
    s1 = train(_model(), data, _cfg(max_iters=10_000, time_budget_s=0.3), tmp_path, progress=False)
    assert s1["stopped"] == "time_budget" and 0 < s1["iterations"] < 10_000
    assert s1["train_time_s"] >= 0.3
    final = load_checkpoint(tmp_path / "final.pt")
    assert final["stopped"] == "time_budget" and final["iteration"] == s1["iterations"]
    assert final["train_time_s"] == pytest.approx(s1["train_time_s"])
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["iter"] == s1["iterations"]  # the last step is logged
    s2 = train(_model(), data, _cfg(max_iters=10_000, time_budget_s=0.6), tmp_path, resume=True, progress=False)
    assert s2["iterations"] > s1["iterations"] and s2["train_time_s"] >= 0.6
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == "time_budget"


def test_keyboard_interrupt_saves_a_resumable_checkpoint(tmp_path):
    data = SlowToyDataset(interrupt_at=2 * 5 + 1)  # batch 2: five full iterations, then Ctrl-C while loading
    with pytest.raises(KeyboardInterrupt):
        train(_model(), data, _cfg(checkpoint_every=100), tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 5 and ckpt["stopped"] == "interrupted"
    ref = _model()
    train(ref, ToyDataset(), _cfg(), tmp_path / "ref", progress=False)
    resumed = _model()
    train(resumed, ToyDataset(), _cfg(), tmp_path, resume=True, progress=False)
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


class BNToyDetector(ToyDetector):
    """The toy model with a BatchNorm after its conv; ``interrupt_at``: Ctrl-C on that forward call, after the BN
    layer has updated its running statistics (where a real Ctrl-C lands most often: inside the forward pass)."""

    def __init__(self, interrupt_at=None):
        super().__init__(ToyConfig())
        self.bn = torch.nn.BatchNorm2d(self.cfg.width)
        self.conv.register_forward_hook(lambda m, i, o: self.bn(o))
        self.interrupt_at, self.calls = interrupt_at, 0
        self.bn.register_forward_hook(self._maybe_interrupt)

    def _maybe_interrupt(self, module, inputs, output):
        if self.training:
            self.calls += 1
            if self.calls == self.interrupt_at:
                raise KeyboardInterrupt


def _bn_model(**kw):
    torch.manual_seed(0)
    return BNToyDetector(**kw)


def test_keyboard_interrupt_inside_the_forward_pass_resumes_exactly(tmp_path):
    """Ctrl-C after BatchNorm has seen iteration 6's batch: the checkpoint holds the statistics of 5 iterations,
    and the resumed run ends bit-identical to an uninterrupted one (buffers and batch counter included)."""
    with pytest.raises(KeyboardInterrupt):
        train(_bn_model(interrupt_at=6), ToyDataset(), _cfg(checkpoint_every=100), tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 5 and ckpt["stopped"] == "interrupted"
    assert int(ckpt["model"]["bn.num_batches_tracked"]) == 5
    ref = _bn_model()
    train(ref, ToyDataset(), _cfg(), tmp_path / "ref", progress=False)
    resumed = _bn_model()
    train(resumed, ToyDataset(), _cfg(), tmp_path, resume=True, progress=False)
    ref_state, resumed_state = ref.state_dict(), resumed.state_dict()
    assert int(ref_state["bn.num_batches_tracked"]) == 12
    for k, v in ref_state.items():
        assert torch.equal(v, resumed_state[k]), k


def test_sampler_order_is_a_function_of_seed_and_iteration():
    full = InfiniteBatchSampler(7, 4, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(6)]
    tail = iter(InfiniteBatchSampler(7, 4, seed=3, start_iter=4))
    assert [next(tail) for _ in range(2)] == batches[4:]
    # each epoch (7 consecutive stream positions) is a permutation of the dataset
    stream = [i for b in batches for i, _ in b]
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))
    # DDP ranks split the same global batch into contiguous slices
    r0 = InfiniteBatchSampler(7, 4, seed=3, rank=0, world_size=2)
    r1 = InfiniteBatchSampler(7, 4, seed=3, rank=1, world_size=2)
    assert r0.batch(5) + r1.batch(5) == full.batch(5)
    with pytest.raises(ValueError, match="not divisible"):
        InfiniteBatchSampler(7, 3, world_size=2)


def test_lr_schedule_warmup_then_cosine(tmp_path):
    cfg = _cfg(max_iters=6, warmup_iters=2, warmup_factor=0.1, log_every=1, lr=1e-3)
    train(_model(), ToyDataset(), cfg, tmp_path, progress=False)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(1e-4)  # warm-up starts at warmup_factor × lr
    assert lrs[2] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 6)))
    assert lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)


def test_torch_threads_sets_and_restores_the_count():
    from onestage.engine import torch_threads

    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(other):
            raise RuntimeError("the count is restored on errors too")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match=">= 1"):
        with torch_threads(0):
            pass


def test_resume_refuses_a_changed_learning_rate_and_writes_nothing(tmp_path):
    from onestage.engine.train import ResumeMismatchError

    train(_model(), ToyDataset(), _cfg(max_iters=4, checkpoint_every=2), tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ResumeMismatchError, match=r"lr 0\.001 -> 1000000\.0") as err:
        train(_model(), ToyDataset(), _cfg(max_iters=8, lr=1e6), tmp_path, resume=True, progress=False)
    assert set(err.value.changes) == {"lr"}
    with pytest.raises(ResumeMismatchError, match="batch_size 2 -> 4.*seed 0 -> 3"):
        train(_model(), ToyDataset(), _cfg(max_iters=8, batch_size=4, seed=3), tmp_path, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_applies_a_longer_schedule(tmp_path):
    import json

    train(_model(), ToyDataset(), _cfg(max_iters=4, checkpoint_every=2), tmp_path, progress=False)
    summary = train(_model(), ToyDataset(), _cfg(max_iters=6, checkpoint_every=2, log_every=1), tmp_path,
                    resume=True, progress=False)
    assert summary["iterations"] == 6
    recorded = json.loads((tmp_path / "train_config.json").read_text())["train_cfg"]
    assert recorded["max_iters"] == 6 and recorded["lr"] == _cfg().lr  # what was recorded is what ran


def test_final_checkpoint_is_stored_once_and_survives_a_resumed_last(tmp_path):
    train(_model(), ToyDataset(), _cfg(max_iters=4, checkpoint_every=2), tmp_path, progress=False)
    last, final = tmp_path / "last.pt", tmp_path / "final.pt"
    assert final.read_bytes() == last.read_bytes()
    assert os.stat(final).st_ino == os.stat(last).st_ino  # a hard link on this filesystem: one copy on disk
    assert not list(tmp_path.glob(".*.link"))
    old_final = final.read_bytes()
    train(_model(), ToyDataset(), _cfg(max_iters=6, checkpoint_every=1), tmp_path, resume=True, progress=False)
    assert load_checkpoint(final)["iteration"] == 6 and load_checkpoint(last)["iteration"] == 6
    assert old_final != final.read_bytes()


def test_share_checkpoint_copies_where_there_are_no_hard_links(tmp_path, monkeypatch):
    from onestage.engine.checkpoint import share_checkpoint

    src = tmp_path / "a.pt"
    src.write_bytes(b"abc")

    def no_links(*a):
        raise OSError("no hard links here")

    monkeypatch.setattr(os, "link", no_links)
    share_checkpoint(src, tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() == b"abc" and os.stat(src).st_ino != os.stat(tmp_path / "b.pt").st_ino


def test_training_refuses_data_with_other_classes_before_writing_anything(tmp_path):
    from onestage.engine.checkpoint import ClassMismatchError

    data = ToyDataset()  # 2 classes: class0, class1
    torch.manual_seed(0)
    with pytest.raises(ClassMismatchError, match="predicts 5 classes, the training data has 2"):
        train(ToyDetector(ToyConfig(), num_classes=5), data, _cfg(max_iters=2), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    train(_model(), data, _cfg(max_iters=2), tmp_path / "b", progress=False)
    before = (tmp_path / "b" / "last.pt").read_bytes()
    with pytest.raises(ClassMismatchError, match=r"trained on the classes \['class0', 'class1'\]"):
        train(_model(), data, _cfg(max_iters=4), tmp_path / "b", resume=True, progress=False,
              class_names=["class1", "class0"])
    assert (tmp_path / "b" / "last.pt").read_bytes() == before


class _Unused(ToyDetector):
    """The toy with a parameter the loss never reads (so poisoning it leaves the loss finite)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.spare = torch.nn.Parameter(torch.zeros(3))


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    torch.manual_seed(0)
    model = _Unused(ToyConfig())

    def poison(iteration, m, t):
        if iteration == 3:
            with torch.no_grad():
                m.spare[1] = float("nan")

    with pytest.raises(NonFiniteLossError, match=r"non-finite weights at iteration 4.*spare") as err:
        train(model, ToyDataset(), _cfg(max_iters=6, checkpoint_every=2), tmp_path, progress=False, on_step=poison)
    assert err.value.kind == "weights" and err.value.checkpoint == tmp_path / "last.pt"
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_overflowing_gradients_with_a_finite_loss_stop_before_the_step(tmp_path):
    for clip in (10.0, 0.0):  # the norm clip_grad_norm computes, and the check's own without clipping
        model = _model()
        before = [q.detach().clone() for q in model.parameters()]
        model.cls.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        with pytest.raises(NonFiniteLossError, match=r"non-finite gradients at iteration 1: \['grad_norm'\]") as e:
            train(model, ToyDataset(), _cfg(max_iters=4, clip_grad_norm=clip), tmp_path / str(clip), progress=False)
        assert e.value.kind == "gradients" and math.isfinite(e.value.losses["loss"])
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was not taken
        assert not (tmp_path / str(clip) / "last.pt").exists()
