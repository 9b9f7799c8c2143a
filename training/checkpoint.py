"""Training checkpoints: model and optimizer state plus everything needed to rebuild and serve the model."""
import torch
from torch.nn.parallel import DistributedDataParallel

from visual_search.fileio import write_atomically
from visual_search.model import ProductNet
from visual_search.preprocessing import PreprocessSettings

CHECKPOINT_FORMAT = 1


def save_checkpoint(path, *, model, optimizer, scheduler, epoch, categories, preprocess, metrics, args):
    """Writes atomically: a crash while writing leaves any earlier file at `path` as it was.

    A DistributedDataParallel wrapper is taken off `model`, so the keys never carry its "module." prefix.
    """
    model = model.module if isinstance(model, DistributedDataParallel) else model
    save_state(path, {
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


def save_state(path, state):
    """torch.save through a unique temporary file, fsynced and renamed over `path` (last.pt and best.pt are
    replaced each epoch): a crash while writing leaves any earlier file at `path` as it was."""
    write_atomically(path, lambda f: torch.save(state, f), replace=True)


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
