"""Unit-length embeddings of every Fashion-MNIST photo with a trained bundle's model, cached on disk (embeddings.npy,
items.csv, and meta.json with the weights' sha256, so that a new model is embedded again)."""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.dataset import ItemDataset, make_loader
from visual_search.bundle import MANIFEST_FILE, MODEL_FILE
from visual_search.catalogue.vectors import SegmentWriter, l2_normalize
from visual_search.cli import HelpFormatter
from visual_search.fileio import sha256_file
from visual_search.items import read_csv, scan_folder, write_csv
from visual_search.model import ProductNet
from visual_search.preprocessing import PreprocessSettings, eval_transform

EMBEDDINGS, ITEMS, META = "embeddings.npy", "items.csv", "meta.json"


USAGE = """examples:
  python -m benchmarks.real_embeddings --bundle runs/demo/bundle --images data/fashion-mnist/images \
      --out results/index_scale/real
"""

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--bundle", default="runs/demo/bundle", help="bundle with model.pt and manifest.json")
    p.add_argument("--images", default="data/fashion-mnist/images", help="folder of <category>/<image> files")
    p.add_argument("--out", default="results/index_scale/real")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def cached(out, weights_sha):
    """(embeddings path, items) when `out` holds embeddings of this model, else None."""
    try:
        meta = json.loads((out / META).read_text())
        items = read_csv(out / ITEMS)
        array = np.load(out / EMBEDDINGS, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if meta.get("weights_sha256") != weights_sha or array.shape != (len(items), 2048):
        return None
    return out / EMBEDDINGS, items


@torch.inference_mode()
def embed(bundle, images, out, batch_size=256, workers=1, threads=2):
    """(embeddings path, items), embedding only when the cache does not hold this model's vectors."""
    bundle, images, out = Path(bundle), Path(images), Path(out)
    weights_sha = sha256_file(bundle / MODEL_FILE)
    hit = cached(out, weights_sha)
    if hit:
        return hit
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    categories = manifest["categories"]
    settings = PreprocessSettings.from_dict(manifest["preprocess"])
    model = ProductNet(len(categories))
    model.load_state_dict(torch.load(bundle / MODEL_FILE, map_location="cpu", weights_only=True))
    model.eval()
    torch.set_num_threads(threads)
    items = scan_folder(images)
    out.mkdir(parents=True, exist_ok=True)
    loader = make_loader(ItemDataset(images, items, eval_transform(settings), categories), batch_size,
                         workers=workers)
    started = time.perf_counter()
    writer = SegmentWriter(out / f"{EMBEDDINGS}.partial", len(items))
    for batch, _ in tqdm(loader, desc=f"embedding {len(items)} images", unit="batch"):
        writer.write(l2_normalize(model.backbone(batch).numpy()))
    writer.close()
    (out / f"{EMBEDDINGS}.partial").rename(out / EMBEDDINGS)
    write_csv(items, out / ITEMS)
    (out / META).write_text(json.dumps({
        "weights_sha256": weights_sha, "bundle": str(bundle), "images": str(images), "count": len(items),
        "categories": categories, "preprocess": settings.to_dict(), "normalized": True,
        "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    return out / EMBEDDINGS, items


def main(argv=None):
    args = get_args(argv)
    try:
        path, items = embed(args.bundle, args.images, args.out, args.batch_size, args.workers, args.threads)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"{len(items)} embeddings in {path}")


if __name__ == "__main__":
    main()
