"""ResNet-50 classifier whose backbone, with the head dropped, is the 2048-d feature extractor."""
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from . import EMBEDDING_DIM


class ProductNet(nn.Module):
    """`backbone(x)` is the 2048-d embedding; `head` maps it to category logits."""

    def __init__(self, num_categories):
        super().__init__()
        self.backbone = resnet50(weights=None)
        self.backbone.fc = nn.Identity()
        self.head = nn.Linear(EMBEDDING_DIM, num_categories)

    def forward(self, images):
        return self.head(self.backbone(images))

    def embed_and_classify(self, images):
        embeddings = self.backbone(images)
        return embeddings, self.head(embeddings)


def load_backbone_weights(model, weights):
    """`weights`: "imagenet" (torchvision's published weights, downloaded once), a local file, or "none"."""
    if weights in (None, "none"):
        return model
    if weights == "imagenet":
        try:
            state = ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=True)
        except OSError as error:  # URLError is an OSError
            raise RuntimeError(
                "could not download torchvision's ImageNet ResNet-50 weights (offline?). "
                "Download resnet50-11ad3fa6.pth elsewhere and pass its path, or use --weights none. "
                f"Cause: {error}"
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit ResNet-50: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def build_model(num_categories, weights="none"):
    return load_backbone_weights(ProductNet(num_categories), weights)


def pick_device(requested="auto"):
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested} asked for, but CUDA is not available")
    return device
