"""Decode every photo a run will use before the run starts, so that broken files are named up front.

Each file is read and fully decoded by the service's own decoder (images.open_image), in the data loader's
worker processes; under torchrun each rank checks its own contiguous share. Unreadable files are listed by path,
and the run either stops with that list or, with --skip-bad, leaves them out and writes the list to its folder.
"""
import csv
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training import distributed
from visual_search.errors import InputError
from visual_search.images import open_image

BAD_PHOTOS_FILE = "bad-photos.csv"
SHOWN = 10  # paths named in the error message; the file has them all


class BadPhotosError(ValueError):
    """Photos that cannot be decoded; `bad` is [(path, reason)]."""

    def __init__(self, bad, listed_in):
        self.bad = bad
        shown = "\n".join(f"  {path}: {reason}" for path, reason in bad[:SHOWN])
        more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        super().__init__(f"{len(bad)} photo(s) cannot be decoded (all listed in {listed_in}); fix or remove them, "
                         f"or pass --skip-bad to leave them out:\n{shown}{more}")


class _Decode(Dataset):
    """Item i -> (i, "") when its file decodes, else (i, reason)."""

    def __init__(self, root, items, size):
        self.root, self.items, self.size = Path(root), items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            open_image(self.root / self.items[i].image, self.size)
        except InputError as error:
            return i, error.reason
        except Exception as error:  # unreadable for any reason (missing, permissions, a decoder bug): list it
            return i, f"{type(error).__name__}: {error}"
        return i, ""


def _as_list(batch):
    return batch


def find_bad_photos(root, items, size=None, workers=0, progress=True):
    """[(path, reason)] for the items whose file cannot be decoded (at input side `size`, as the run will), in
    item order."""
    if not items:
        return []
    loader = DataLoader(_Decode(root, items, size), batch_size=32, num_workers=workers, collate_fn=_as_list,
                        generator=torch.Generator())  # its own generator: the global RNG (initial weights) is untouched
    bad = []
    for batch in tqdm(loader, desc="checking photos", unit="batch", disable=not progress, leave=False):
        bad.extend((str(Path(root) / items[i].image), reason) for i, reason in batch if reason)
    return bad


def write_bad_photos(bad, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "reason"))
        writer.writerows(bad)


def check_photos(ctx, root, items, out_dir, skip_bad=False, size=None, workers=0, remove_stale=True):
    """The items whose photos decode, the same list on every rank.

    Any bad photos are written to out_dir/bad-photos.csv (by rank 0); without `skip_bad` they raise
    BadPhotosError. When every photo decodes, an earlier run's bad-photos.csv is removed if `remove_stale`
    (a resumed run keeps the list of what its first start left out).
    """
    start, end = distributed.shard_range(len(items), ctx.rank, ctx.world_size)
    local = find_bad_photos(root, items[start:end], size, workers, progress=ctx.is_main)
    bad = [tuple(row) for rows in distributed.gather_json(ctx, local) for row in rows]
    listed_in = Path(out_dir) / BAD_PHOTOS_FILE
    if ctx.is_main:
        if bad:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_bad_photos(bad, listed_in)
        elif remove_stale:
            listed_in.unlink(missing_ok=True)
    if bad and not skip_bad:
        raise BadPhotosError(bad, listed_in)
    if bad and ctx.is_main:
        print(f"skipping {len(bad)} photo(s) that cannot be decoded, listed in {listed_in}")
    bad_paths = {path for path, _ in bad}
    return [it for it in items if str(Path(root) / it.image) not in bad_paths]
