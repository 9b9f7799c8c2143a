"""The whole pipeline on the embedded Fashion-MNIST catalogue: data, training, index, archive, TorchServe, queries
(`make demo`, or `.venv/bin/python -m demo --profile cpu|gpu`). Without a GPU it trains on a seeded subset at a
small input size, and says so; with one, at 225x225 on all 70,000 images."""
import argparse
import concurrent.futures
import json
import time
from pathlib import Path

import requests
import torch

from serving.build_archive import main as build_archive
from serving.torchserve import DEFAULT_STATE, ROOT, TorchServe
from training.build_index import main as build_index
from training.evaluate import main as evaluate
from training.fashion_mnist import DEFAULT_SOURCE, export_folders
from training.plot import draw_results
from training.train import main as train
from visual_search.items import read_csv

PROFILES = {
    # 6,000 training images at 48 px, 3 epochs of one-cycle SGD: about 4 minutes of training on 2 cores.
    "cpu": dict(image_size=48, max_per_category=857, epochs=3, batch_size=64, lr=0.02, eval_per_category=200,
                serve_batch=4, serve_delay_ms=5),
    # The full catalogue at the service's 225 px.
    "gpu": dict(image_size=225, max_per_category=None, epochs=8, batch_size=64, lr=0.02, eval_per_category=None,
                serve_batch=64, serve_delay_ms=5),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["auto", *PROFILES], default="auto", help="auto: gpu if CUDA is available")
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help="folder with the Fashion-MNIST idx files")
    p.add_argument("--data-dir", default=str(ROOT / "data" / "fashion-mnist" / "images"))
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"))
    p.add_argument("--name", default="visual-search")
    p.add_argument("--queries", type=int, default=6, help="held-out photos sent to the service")
    p.add_argument("--weights", default="none", help='"imagenet", "none" or a weights file (offline: none)')
    p.add_argument("--keep-serving", action="store_true", help="leave TorchServe running at the end")
    return p.parse_args(argv)


def step(title):
    print(f"\n=== {title}", flush=True)
    return time.time()


def pick_queries(val_items, n):
    """The first held-out item of each category in turn, so the queries cover different categories."""
    by_category = {}
    for item in val_items:
        by_category.setdefault(item.category, item)
    return list(by_category.values())[:n]


def ask_service(server, name, data_dir, queries):
    url = f"{server.urls['inference']}/predictions/{name}"

    def post(item):
        body = (Path(data_dir) / item.image).read_bytes()
        response = requests.post(url, data=body, headers=server.headers(), timeout=120)
        response.raise_for_status()
        return response.json()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # concurrent, so TorchServe batches them
        return list(pool.map(post, queries))


def main(argv=None):
    args = get_args(argv)
    profile_name = args.profile if args.profile != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    profile = PROFILES[profile_name]
    run_dir, data_dir = Path(args.run_dir), Path(args.data_dir)
    started = time.time()
    if profile_name == "cpu":
        print(f"No GPU: training on a seeded subset ({profile['max_per_category']} images per category) at "
              f"{profile['image_size']}x{profile['image_size']} for {profile['epochs']} epochs. "
              f"The service default and the GPU profile use 225x225 and all 70,000 images.")

    t = step("1/6 catalogue: Fashion-MNIST idx files -> one folder of PNGs per category")
    count = export_folders(data_dir, args.source)
    print(f"{count} images in {data_dir} ({time.time() - t:.0f}s)")

    t = step("2/6 training the ResNet-50 classifier")
    train(["--data-dir", str(data_dir), "--out-dir", str(run_dir), "--image-size", str(profile["image_size"]),
           "--epochs", str(profile["epochs"]), "--batch-size", str(profile["batch_size"]), "--lr", str(profile["lr"]),
           "--schedule", "onecycle", "--weights", args.weights]
          + (["--max-per-category", str(profile["max_per_category"])] if profile["max_per_category"] else []))
    print(f"trained in {time.time() - t:.0f}s; checkpoints in {run_dir}")

    t = step("3/6 embedding the catalogue (the training split) with the fastest runtime that passes the parity gate "
             "and publishing it as a catalogue folder")
    build_index(["--checkpoint", str(run_dir / "last.pt"), "--data-dir", str(data_dir),
                 "--out-dir", str(run_dir / "bundle")])
    print(f"({time.time() - t:.0f}s)")

    t = step("4/6 evaluating on held-out images")
    metrics = evaluate(["--bundle", str(run_dir / "bundle"), "--data-dir", str(data_dir), "--queries",
                        str(run_dir / "val.csv"), "--k", "4", "--out", str(run_dir / "evaluation.json")]
                       + (["--max-per-category", str(profile["eval_per_category"])]
                          if profile["eval_per_category"] else []))
    print(f"({time.time() - t:.0f}s)")

    t = step("5/6 packing the TorchServe archive")
    archive = build_archive(["--bundle", str(run_dir / "bundle"), "--name", args.name, "--version", "1.0",
                             "--batch-size", str(profile["serve_batch"]),
                             "--max-batch-delay", str(profile["serve_delay_ms"]), "--replace"])

    t = step("6/6 serving with TorchServe and asking it about held-out photos")
    server = TorchServe(DEFAULT_STATE)
    server.stop()
    server.start([archive.name])
    print(f"TorchServe ready in {time.time() - t:.0f}s at {server.urls['inference']}")
    try:
        queries = pick_queries(read_csv(run_dir / "val.csv"), args.queries)
        answers = ask_service(server, args.name, data_dir, queries)
    finally:
        if not args.keep_serving:
            server.stop()
    for item, answer in zip(queries, answers):
        print(f"\nquery {item.id} ({item.category}) -> predicted {answer['category']} "
              f"({answer['confidence']:.0%}), model v{answer['model_version']}")
        for rank, n in enumerate(answer["neighbours"], 1):
            mark = "ok" if n["category"] == item.category else "--"
            print(f"  {rank}. {mark} {n['id']:<20} {n['category']:<12} distance {n['distance']:.4f}  {n['image']}")

    picture = draw_results([(data_dir / q.image, q.category, a) for q, a in zip(queries, answers)], data_dir,
                           run_dir / "results.png", title=f"{args.name}: held-out queries and their top-4 "
                                                          f"catalogue neighbours (green = same category)")
    summary = {"profile": profile_name, **{k: metrics[k] for k in ("test_accuracy", "precision_at_4", "queries",
                                                                     "catalogue_items", "image_size", "runtime")},
               "seconds": round(time.time() - started), "archive": str(archive), "picture": str(picture)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n=== done in {summary['seconds']}s\n"
          f"test accuracy  {metrics['test_accuracy']:.4f}\n"
          f"precision@4    {metrics['precision_at_4']:.4f}   ({metrics['queries']} held-out queries, "
          f"{metrics['catalogue_items']} catalogue items)\n"
          f"runtime        {metrics['runtime']} (the parity gate's choice: {run_dir / 'bundle' / 'manifest.json'})\n"
          f"results picture {picture}\narchive {archive}\n"
          + ("TorchServe is still running: make stop" if args.keep_serving else "serve it again with: make serve"))
    return summary


if __name__ == "__main__":
    main()
