"""Does a runtime setting find the same neighbours as fp32? Top-k agreement of the whole path (decode, preprocess,
model, search) over held-out queries, on a trained bundle or a synthetic one."""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from loadtests.photos import load_photos, product_jpeg
from tests.harness import synthetic_bundle
from visual_search.bundle import load_bundle
from visual_search.cli import HelpFormatter
from visual_search.request import Limits
from visual_search.runtime import PRECISIONS, Runtime, RuntimeSettings

USAGE = """examples:
  python -m benchmarks.parity --device cuda --precision fp16 --channels-last --compile --gpu-decode
  python -m benchmarks.parity --device cpu --precision bf16 --image-size 64 --queries 100
"""

def run_path(bundle_dir, settings, device, queries, k, batch_size=64):
    """(embeddings [N, 2048], top-k ids [N, k]) of `queries` (image bytes) through a Runtime."""
    bundle = load_bundle(bundle_dir)
    runtime = Runtime(bundle, device, settings, warmup_batch=min(batch_size, len(queries)))
    embeddings = []
    for start in range(0, len(queries), batch_size):
        rows = [{"body": body} for body in queries[start:start + batch_size]]
        prepared = runtime.prepare(rows, [{}] * len(rows), Limits(k, k))
        assert not any(prepared.errors), prepared.errors
        embeddings.append(runtime.embed(prepared.batch)[0])
    embeddings = np.concatenate(embeddings)
    return embeddings, top_ids(bundle.catalogue, embeddings, k)


def top_ids(catalogue, embeddings, k):
    return np.array([[n.id for n in hits.neighbours] for hits in catalogue.search(embeddings, k)])


def agreement(bundle_dir, queries, settings, device, k=4):
    reference, ref_top = run_path(bundle_dir, RuntimeSettings(), "cpu" if device == "cpu" else device, queries, k)
    fast, fast_top = run_path(bundle_dir, settings, device, queries, k)
    same_set = np.mean([set(a) == set(b) for a, b in zip(ref_top, fast_top)])
    cosine = np.sum(reference * fast, axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(fast, axis=1))
    return {"queries": len(queries), "k": k, "top_k_agreement": float(same_set),
            "same_order": float(np.mean(np.all(ref_top == fast_top, axis=1))),
            "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "settings": settings.to_dict(), "device": str(device)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--bundle", help="a real bundle; --queries-dir then names held-out photos")
    p.add_argument("--queries-dir", help="held-out images for --bundle")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--gpu-decode", action="store_true")
    p.add_argument("--image-size", type=int, default=225)
    p.add_argument("--catalogue", type=int, default=500, help="synthetic catalogue photos")
    p.add_argument("--queries", type=int, default=200, help="synthetic held-out queries")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    settings = RuntimeSettings(args.precision, args.channels_last, args.compile, args.gpu_decode)
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            bundle, queries = args.bundle, load_photos(args.queries_dir, args.queries)
        else:
            catalogue = load_photos(count=args.catalogue)
            bundle = synthetic_bundle(Path(tmp) / "bundle", args.image_size, catalogue[:64], catalogue,
                                      catalogue_size=len(catalogue))
            queries = [product_jpeg(100_000 + i) for i in range(args.queries)]
        result = agreement(bundle, queries, settings, args.device, args.k)
    print(f"top-{args.k} agreement {result['top_k_agreement']:.4f} over {result['queries']} held-out queries "
          f"(same order {result['same_order']:.4f}, mean cosine {result['mean_cosine']:.5f}, min "
          f"{result['min_cosine']:.5f}); {settings.to_dict()} on {args.device}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["top_k_agreement"] >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
