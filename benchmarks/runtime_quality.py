"""Quality per runtime on a trained model: a bundle built by training.build_index for each runtime (its own catalogue
embedded by it, its parity gate), evaluated by training.evaluate on the held-out photos; one table of test accuracy
and precision@4, with the gate's figures. For the demo: --checkpoint runs/demo/last.pt. See docs/performance.md."""
import argparse
import json
import sys
import time
from pathlib import Path

from training.build_index import main as build_index
from training.evaluate import main as evaluate
from training.parity_gate import RUNTIME_NAMES
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m benchmarks.runtime_quality --checkpoint runs/demo/last.pt --data-dir data/fashion-mnist/images \\
      --queries runs/demo/val.csv --max-per-category 200 --out results/quality
"""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--queries", required=True, help="held-out photos (the run's val.csv)")
    p.add_argument("--catalogue", default=None, help="catalogue CSV (default: train.csv beside the checkpoint)")
    p.add_argument("--max-per-category", type=int, default=None, help="evaluate on a seeded subset, as the demo")
    p.add_argument("--runtimes", default=",".join(RUNTIME_NAMES[1:]))
    p.add_argument("--out", default="results/quality")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    out, rows = Path(args.out), []
    for name in args.runtimes.split(","):
        bundle, start = out / name, time.perf_counter()
        build_index(["--checkpoint", args.checkpoint, "--data-dir", args.data_dir, "--out-dir", str(bundle),
                     "--runtime", name, "--queries", args.queries, "--accept-quality-drop",
                     *(["--catalogue", args.catalogue] if args.catalogue else [])])
        built = time.perf_counter() - start
        metrics = evaluate(["--bundle", str(bundle), "--data-dir", args.data_dir, "--queries", args.queries,
                            "--out", str(bundle / "evaluation.json"),
                            *(["--max-per-category", str(args.max_per_category)] if args.max_per_category else [])])
        gate = json.loads((bundle / "manifest.json").read_text())["parity"]["tried"][-1]
        rows.append({"runtime": name, "test_accuracy": metrics["test_accuracy"],
                     "precision_at_4": metrics["precision_at_4"], "queries": metrics["queries"],
                     "catalogue_items": metrics["catalogue_items"], "build_seconds": round(built), "gate": gate})
    print(f"\n{'runtime':<14} {'accuracy':>8} {'precision@4':>11} {'gate p@4':>8} {'gate fp32':>9} "
          f"{'recall@10 vs fp32':>17} {'build s':>7}")
    for row in rows:
        gate = row["gate"]
        print(f"{row['runtime']:<14} {row['test_accuracy']:>8.4f} {row['precision_at_4']:>11.4f} "
              f"{gate.get('precision_at_4', float('nan')):>8.4f} {gate.get('fp32_precision_at_4', float('nan')):>9.4f} "
              f"{gate.get('recall_at_10_vs_fp32', float('nan')):>17.4f} {row['build_seconds']:>7}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
