"""A torch Dataset over catalogue items, decoding each file exactly as the service decodes uploads."""
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .images import open_image


class ItemDataset(Dataset):
    def __init__(self, root, items, transform, categories):
        self.root = Path(root)
        self.items = list(items)
        self.transform = transform
        self.category_index = {name: i for i, name in enumerate(categories)}
        unknown = {it.category for it in self.items} - set(self.category_index)
        if unknown:
            raise ValueError(f"items in categories the model does not know: {sorted(unknown)}")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        image = open_image(self.root / item.image)
        return self.transform(image), self.category_index[item.category]


def make_loader(dataset, batch_size, shuffle=False, workers=0, seed=None, drop_last=False):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=generator, drop_last=drop_last, persistent_workers=workers > 0)
