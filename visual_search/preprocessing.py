"""The one preprocessing pipeline: training, evaluation, indexing and the handler all build it from here.

Its settings travel inside every checkpoint and every archive, so the handler reads them rather than copies them.
"""
import json
from dataclasses import asdict, dataclass, field

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSettings:
    image_size: int = 225
    mean: tuple = field(default=IMAGENET_MEAN)
    std: tuple = field(default=IMAGENET_STD)

    def __post_init__(self):
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 16..1024, not {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three values, one per RGB channel")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values):
        unknown = set(values) - {"image_size", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown preprocessing settings: {sorted(unknown)}")
        return cls(**values)

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _tensor_steps(settings):
    return [
        v2.ToImage(),
        v2.Resize((settings.image_size, settings.image_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(settings.mean, settings.std),
    ]


def eval_transform(settings):
    """RGB PIL image -> normalised 3xSxS float tensor. Used for validation, indexing and serving."""
    return v2.Compose(_tensor_steps(settings))


def train_transform(settings, augment=False):
    """The eval transform, optionally behind a random horizontal flip."""
    steps = _tensor_steps(settings)
    if augment:
        steps = [v2.RandomHorizontalFlip()] + steps
    return v2.Compose(steps)
