"""DDP: two CPU processes (torchrun, gloo) end with identical weights, equal to one process with the same global
batch, and only rank 0 writes files."""
import os
import subprocess
import sys
import textwrap

import torch

from onestage.config import get_train_config
from onestage.engine.checkpoint import load_checkpoint
from onestage.engine.toy import ToyConfig, ToyDataset, ToyDetector
from onestage.engine.train import read_metrics, train

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from onestage.config import get_train_config
    from onestage.engine.toy import ToyConfig, ToyDataset, ToyDetector
    from onestage.engine.train import train

    torch.manual_seed(0)
    model = ToyDetector(ToyConfig())
    cfg = get_train_config("smoke", batch_size=4, max_iters=6, checkpoint_every=3, num_workers=0)
    summary = train(model, ToyDataset(n=10), cfg, sys.argv[1], progress=False)
    assert summary["world_size"] == 2
    torch.save(model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
""")


def test_two_process_gloo_training(tmp_path):
    script, out, weights = tmp_path / "ddp.py", tmp_path / "run", tmp_path / "weights"
    script.write_text(SCRIPT)
    weights.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), str(weights)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    w0, w1 = torch.load(weights / "rank0.pt"), torch.load(weights / "rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # one writer: one set of files, one log line per iteration, the checkpoint holds the synchronised weights
    assert sorted(p.name for p in out.iterdir()) == [
        "final.pt", "last.pt", "metrics.jsonl", "summary.json", "train_config.json"]
    assert [r["iter"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))
    ckpt = load_checkpoint(out / "final.pt")
    assert ckpt["world_size"] == 2 and ckpt["iteration"] == 6
    for k in w0:
        assert torch.equal(ckpt["model"][k], w0[k]), k

    # the same global batch in one process sees the same samples; gradients agree up to float summation order
    torch.manual_seed(0)
    single = ToyDetector(ToyConfig())
    cfg = get_train_config("smoke", batch_size=4, max_iters=6, checkpoint_every=3, num_workers=0)
    train(single, ToyDataset(n=10), cfg, tmp_path / "single", progress=False)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(v, w0[k], rtol=1e-5, atol=1e-6)
