"""How much do fp16 and bf16 move the neighbours? The model cast to each precision on the CPU, against fp32, on a
trained bundle and its held-out photos."""
import argparse

import numpy as np
import torch

from benchmarks.parity import top_ids
from training.dataset import ItemDataset
from visual_search.bundle import load_bundle
from visual_search.catalogue.vectors import l2_normalize
from visual_search.cli import HelpFormatter
from visual_search.items import read_csv
from visual_search.preprocessing import eval_transform

USAGE = """examples:
  python -m benchmarks.precision_parity --bundle runs/demo/bundle --queries runs/demo/val.csv \
      --data-dir data/fashion-mnist/images --count 1000
"""

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--queries", required=True, help="CSV of held-out images")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--k", type=int, default=4)
    return p.parse_args(argv)


@torch.inference_mode()
def embeddings(bundle_dir, images, dtype):
    model = load_bundle(bundle_dir).model.eval().to(dtype)
    return l2_normalize(torch.cat([model.backbone(images[i:i + 100].to(dtype)).float()
                                   for i in range(0, len(images), 100)]).numpy())


def main(argv=None):
    args = get_args(argv)
    bundle = load_bundle(args.bundle)
    items = read_csv(args.queries)
    items = items[::max(1, len(items) // args.count)][:args.count]
    dataset = ItemDataset(args.data_dir, items, eval_transform(bundle.preprocess), bundle.categories,
                          decode_size=bundle.preprocess.image_size)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    reference = embeddings(args.bundle, images, torch.float32)
    ref_top = top_ids(bundle.catalogue, reference, args.k)
    for name, dtype in DTYPES.items():
        fast = embeddings(args.bundle, images, dtype)
        top = top_ids(bundle.catalogue, fast, args.k)
        cosine = (fast * reference).sum(axis=1)
        print(f"{name}: {len(items)} queries, top-{args.k} same set "
              f"{np.mean([set(a) == set(b) for a, b in zip(ref_top, top)]):.3f}, same order "
              f"{np.mean((ref_top == top).all(axis=1)):.3f}, top-1 {np.mean(ref_top[:, 0] == top[:, 0]):.3f}, "
              f"cosine mean {cosine.mean():.6f} min {cosine.min():.6f}")


if __name__ == "__main__":
    main()
