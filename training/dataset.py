"""A torch Dataset over catalogue items, decoding each file exactly as the service decodes uploads."""
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from visual_search.errors import InputError
from visual_search.images import open_image


class UnreadablePhotoError(ValueError):
    """A catalogue photo that cannot be decoded; the message names its path."""


class ItemDataset(Dataset):
    """(transformed image, category index) per item; `decode_size` is the model's input side, as the handler uses."""

    def __init__(self, root, items, transform, categories, decode_size=None):
        self.root = Path(root)
        self.items = list(items)
        self.transform = transform
        self.decode_size = decode_size
        self.category_index = {name: i for i, name in enumerate(categories)}
        unknown = {it.category for it in self.items} - set(self.category_index)
        if unknown:
            raise ValueError(f"items in categories the model does not know: {sorted(unknown)}")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        path = self.root / item.image
        try:
            image = open_image(path, self.decode_size)
        except (InputError, OSError) as error:
            raise UnreadablePhotoError(f"cannot decode {path}: {error}") from None
        return self.transform(image), self.category_index[item.category]


class ShardSampler(Sampler):
    """Rank `rank`'s share of `count` indices, every `world_size`-th one, with no padding (for evaluation)."""

    def __init__(self, count, rank, world_size):
        self.indices = range(rank, count, world_size)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def make_loader(dataset, batch_size, shuffle=False, workers=0, seed=None, drop_last=False, sampler=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                      generator=generator, drop_last=drop_last, persistent_workers=workers > 0)
