"""Training checkpoints: model and optimizer state plus everything needed to rebuild and serve the model."""
import torch

from .model import ProductNet
from .preprocessing import PreprocessSettings

CHECKPOINT_FORMAT = 1


def save_checkpoint(path, *, model, optimizer, scheduler, epoch, categories, preprocess, metrics, args):
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch,
            "categories": list(categories),
            "preprocess": preprocess.to_dict(),
            "metrics": dict(metrics),
            "args": dict(args),
        },
        path,
    )


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
