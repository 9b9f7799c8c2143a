"""Training checkpoints: model and optimizer state plus everything needed to rebuild and serve the model."""
import os
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .model import ProductNet
from .preprocessing import PreprocessSettings

CHECKPOINT_FORMAT = 1


def save_checkpoint(path, *, model, optimizer, scheduler, epoch, categories, preprocess, metrics, args):
    """Writes atomically: a crash while writing leaves any earlier file at `path` as it was.

    A DistributedDataParallel wrapper is taken off `model`, so the keys never carry its "module." prefix.
    """
    model = model.module if isinstance(model, DistributedDataParallel) else model
    write_atomically(path, {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "categories": list(categories),
        "preprocess": preprocess.to_dict(),
        "metrics": dict(metrics),
        "args": dict(args),
    })


def write_atomically(path, state):
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over `path`."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def load_checkpoint(path):
    """Reads a checkpoint without unpickling arbitrary objects and checks that it is one of ours."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of format {CHECKPOINT_FORMAT}")
    return checkpoint


def model_from_checkpoint(checkpoint):
    """(ProductNet in eval mode, categories, PreprocessSettings)."""
    categories = checkpoint["categories"]
    model = ProductNet(len(categories))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, categories, PreprocessSettings.from_dict(checkpoint["preprocess"])
