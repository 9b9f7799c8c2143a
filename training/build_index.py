"""Embed the catalogue with a trained checkpoint and write the search bundle (weights, FAISS index, metadata).

    python -m training.build_index --checkpoint runs/x/best.pt --data-dir data/photos --out-dir runs/x/bundle

The catalogue is the checkpoint's training split (train.csv beside it) unless --catalogue names a CSV or --all
takes every image under --data-dir.
"""
import argparse
from pathlib import Path

import numpy as np

from visual_search.bundle import write_bundle
from visual_search.catalogue import read_csv, scan_folder
from visual_search.checkpoint import load_checkpoint, model_from_checkpoint
from visual_search.embedding import embed_items
from visual_search.index import DEFAULT_FACTORY, build_index, l2_normalize
from visual_search.model import pick_device

EMBEDDINGS_FILE = "embeddings.npy"  # beside the bundle, for catalogue updates; not shipped in the archive


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True, help="root that catalogue image references are relative to")
    p.add_argument("--out-dir", required=True)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--catalogue", help="CSV of id,category,image (default: train.csv beside the checkpoint)")
    source.add_argument("--all", action="store_true", help="index every image under --data-dir")
    p.add_argument("--factory", default=DEFAULT_FACTORY, help='FAISS index_factory string, e.g. "Flat", "HNSW32", '
                                                              '"IVF256,Flat"')
    p.add_argument("--no-normalize", action="store_true", help="index raw embeddings instead of unit-length ones")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def catalogue_items(args):
    if args.all:
        return scan_folder(args.data_dir)
    path = Path(args.catalogue) if args.catalogue else Path(args.checkpoint).parent / "train.csv"
    if not path.is_file():
        raise FileNotFoundError(f"catalogue list {path} not found: pass --catalogue or --all")
    return read_csv(path)


def embed_catalogue(model, data_dir, items, categories, preprocess, normalize, device="auto", batch_size=64,
                    workers=0):
    """float32 [N, 2048] embeddings of `items`, unit-length if `normalize`: the vectors the index holds."""
    embeddings, _ = embed_items(model, data_dir, items, categories, preprocess, pick_device(device), batch_size,
                                workers, desc="embedding catalogue")
    return l2_normalize(embeddings) if normalize else embeddings.astype(np.float32)


def write_indexed_bundle(out_dir, *, model, categories, preprocess, items, embeddings, factory, normalize, notes,
                         runtime=None):
    """Builds the index over `embeddings` and writes the bundle, with embeddings.npy beside it for later updates."""
    out_dir = Path(out_dir)
    manifest = write_bundle(out_dir, model=model.cpu(), categories=categories, preprocess=preprocess,
                            index=build_index(embeddings, factory), items=items, index_factory=factory,
                            normalize=normalize, runtime=runtime, notes=notes)
    np.save(out_dir / EMBEDDINGS_FILE, np.asarray(embeddings, dtype=np.float32))
    print(f"indexed {manifest['num_items']} items ({factory}, {'unit-length' if normalize else 'raw'} "
          f"embeddings) in {out_dir}")
    return manifest


def main(argv=None):
    args = get_args(argv)
    model, categories, preprocess = model_from_checkpoint(load_checkpoint(args.checkpoint))
    items = catalogue_items(args)
    normalize = not args.no_normalize
    embeddings = embed_catalogue(model, args.data_dir, items, categories, preprocess, normalize, args.device,
                                 args.batch_size, args.workers)
    return write_indexed_bundle(args.out_dir, model=model, categories=categories, preprocess=preprocess, items=items,
                                embeddings=embeddings, factory=args.factory, normalize=normalize,
                                notes=f"built from {args.checkpoint}")


if __name__ == "__main__":
    main()
