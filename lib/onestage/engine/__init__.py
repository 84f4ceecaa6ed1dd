"""Training, checkpointing and COCO evaluation (see docs/ARCHITECTURE.md for the contracts they rely on)."""
from onestage.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from onestage.engine.evaluate import evaluate, format_metrics
from onestage.engine.train import NonFiniteLossError, torch_threads, train

__all__ = ["train", "evaluate", "format_metrics", "load_model", "load_checkpoint", "save_checkpoint",
           "NonFiniteLossError", "torch_threads"]
