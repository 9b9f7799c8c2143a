"""Index profiles at catalogue scale, each measured in a fresh process: build time and memory, bytes per item,
recall@10 against exact search, queries/s single and batched, filtered, an nprobe sweep, an update against a full
build, and precision@4 on the real embeddings. Compare queries/s as ratios against Flat (docs/large-catalogues.md)."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import synthetic_catalogue as synthetic
from benchmarks.index_scale_report import write_report
from benchmarks.real_embeddings import embed
from visual_search.catalogue.vectors import RowReader
from visual_search.cli import HelpFormatter
from visual_search.items import read_csv, write_csv

USAGE = """examples:
  python -m benchmarks.index_scale                       # 100k and 1M items, every profile
  python -m benchmarks.index_scale --sizes 100000 --threads 2
"""

PROFILES = ("exact", "accurate", "compact")
FILTER_CATEGORY = "coat"  # 10% of Fashion-MNIST, so 10% of every catalogue derived from it
SWEEP = (2, 4, 8, 16, 32, 64)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=PROFILES)
    p.add_argument("--out", default="results/index_scale")
    p.add_argument("--bundle", default="runs/demo/bundle", help="the model that embeds the real photos")
    p.add_argument("--images", default="data/fashion-mnist/images")
    p.add_argument("--real-dir", default="results/index_scale/real", help="cache of the real embeddings")
    p.add_argument("--queries", type=int, default=200, help="synthetic queries per size (recall, batches)")
    p.add_argument("--single", type=int, default=50, help="queries timed one at a time (Flat: a fifth of them)")
    p.add_argument("--threads", type=int, default=1, help="FAISS threads per measured process")
    p.add_argument("--p4-queries", type=int, default=0, help="real items searched for precision@4 (0: all)")
    p.add_argument("--skip-real", action="store_true", help="no precision@4 / recall on the real embeddings")
    p.add_argument("--keep", action="store_true", help="keep the catalogue folders (they are large)")
    return p.parse_args(argv)


def worker(args, *command, threads=1):
    """Runs benchmarks.index_scale_worker in a new process; returns its JSON answer."""
    line = [sys.executable, "-m", "benchmarks.index_scale_worker", "--threads", str(threads), *map(str, command)]
    done = subprocess.run(line, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({done.returncode}): {' '.join(line)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def exact_truth(vectors_path, queries, k, mask, chunk=32_768):
    """Exact top-k rows of `queries` over an .npy of rows, unfiltered and among rows where `mask` holds; read in
    chunks with pread, so memory stays at one chunk."""
    reader = RowReader(vectors_path)
    n = len(queries)
    best = [(np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64)) for _ in range(2)]
    query_norms = (queries ** 2).sum(axis=1, keepdims=True)
    try:
        for start in range(0, len(reader), chunk):
            rows = reader.rows(start, min(start + chunk, len(reader)))
            d = query_norms + (rows ** 2).sum(axis=1)[None, :] - 2.0 * queries @ rows.T
            ids = np.arange(start, start + len(rows))
            for which, keep in enumerate((None, mask[start:start + len(rows)])):
                dd = d if keep is None else np.where(keep[None, :], d, np.inf)
                all_d = np.concatenate([best[which][0], dd], axis=1)
                all_i = np.concatenate([best[which][1], np.broadcast_to(ids, dd.shape)], axis=1)
                top = np.argsort(all_d, axis=1, kind="stable")[:, :k]
                best[which] = (np.take_along_axis(all_d, top, 1), np.take_along_axis(all_i, top, 1))
    finally:
        reader.close()
    return best[0][1], best[1][1]


def recall_at(answers, truth, row_of):
    return float(np.mean([len({row_of(a) for a in found} & set(true.tolist())) / len(true)
                          for found, true in zip(answers, truth)]))


def pss_of(args, folder, queries_path, work):
    """PSS and RSS of two processes that opened the same catalogue and ran the same queries."""
    ready = [work / f"ready-{i}" for i in range(2)]
    release = work / "release"
    for path in [*ready, release]:
        path.unlink(missing_ok=True)
    procs = []
    try:
        for path in ready:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.index_scale_worker", "--threads", str(args.threads), "hold",
                 "--catalogue", folder, "--queries", queries_path, "--ready", path, "--release", release],
                stdout=subprocess.DEVNULL))
            while not path.exists():
                if procs[-1].poll() is not None:
                    raise RuntimeError("a hold worker ended early")
                time.sleep(0.2)
        figures = []
        for proc in procs:
            with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                values = {p[0].rstrip(":").lower(): int(p[1]) * 1024 for p in (line.split() for line in f)
                          if len(p) == 3 and p[2] == "kB"}
            figures.append({key: values.get(key, 0) for key in ("rss", "pss", "pss_anon", "pss_file", "anonymous")})
        return figures
    finally:
        release.write_text("")
        for proc in procs:
            proc.wait()


def run_size(args, model, real_items, size, out):
    work = out / f"n{size}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"=== {size} items", flush=True)
    source, items_csv = work / "embeddings.npy", work / "items.csv"
    catalogues = {profile: work / f"catalogue-{profile}" for profile in args.profiles}
    for folder in catalogues.values():
        if folder.exists():
            shutil.rmtree(folder)
    items = synthetic.write(model, size, source, seed=size, real_items=real_items)
    write_csv(items, items_csv)
    categories = sorted({it.category for it in real_items})
    mask = np.array([it.category == FILTER_CATEGORY for it in items])
    share = float(mask.mean())
    del items
    queries = synthetic.queries(model, args.queries, seed=size + 1)
    np.save(work / "queries.npy", queries)
    print("exact answers by chunked matrix products", flush=True)
    started = time.perf_counter()
    truth, filtered_truth = exact_truth(source, queries, 10, mask)
    result = {"size": size, "filter_category": FILTER_CATEGORY, "filter_share": share,
              "truth_seconds": time.perf_counter() - started, "profiles": {}}

    first = "accurate" if "accurate" in args.profiles else args.profiles[0]  # the full build, from embeddings
    rest = [profile for profile in args.profiles if profile != first]
    print(f"--- publish {first}", flush=True)
    builds = {first: worker(args, "build", "publish", "--out", catalogues[first], "--embeddings", source,
                            "--items", items_csv, "--categories", *categories, "--profile", first, threads=2)}
    for profile in rest:
        print(f"--- re-index as {profile}", flush=True)
        builds[profile] = worker(args, "build", "reindex", "--source", catalogues[first], "--out",
                                 catalogues[profile], "--profile", profile, threads=2)
    source.unlink()  # the catalogue folders hold the vectors now

    update_rows = max(1, size // 100)
    added = synthetic.write(model, update_rows, work / "added.npy", seed=size + 2, real_items=real_items)
    added = [type(it)(f"u{it.id[1:]}", it.category, it.image) for it in added]
    write_csv(added, work / "added.csv")
    removed = [synthetic.item_id(row) for row in range(0, size, 1000)]  # 0.1% of the items
    for profile in args.profiles:
        print(f"--- {profile}: update adding {update_rows} items and removing {len(removed)}, then search",
              flush=True)
        update = worker(args, "build", "update", "--source", catalogues[profile], "--out", work / "update",
                        "--embeddings", work / "added.npy", "--items", work / "added.csv", "--remove", *removed,
                        threads=2)
        shutil.rmtree(work / "update")
        single = args.single if profile != "exact" else max(5, args.single // 5)
        sweep = [] if profile == "exact" else [str(v) for v in SWEEP]
        found = worker(args, "search", "--catalogue", catalogues[profile], "--queries", work / "queries.npy",
                       "--category", FILTER_CATEGORY, "--single", single, *(["--sweep", *sweep] if sweep else []),
                       threads=args.threads)
        row_of = synthetic.row_of
        entry = {
            "build": builds[profile], "update_1pct": update,
            "recall_at_10": recall_at(found["answers"], truth, row_of),
            "filtered_recall_at_10": recall_at(found["filtered_answers"], filtered_truth, row_of),
            "filtered_exactly_k": all(len(a) == 10 for a in found["filtered_answers"]),
            "exactly_k": all(len(a) == 10 for a in found["answers"]),
            "qps_single": 1 / found["single_seconds"], "qps_batch": 1 / found["batch_seconds"],
            "qps_single_filtered": 1 / found["single_filtered_seconds"],
            "qps_batch_filtered": 1 / found["batch_filtered_seconds"],
            "open_seconds": found["open_seconds"], "first_query_seconds": found["first_query_seconds"],
            "memory": {key: found[key] for key in ("memory_before_open", "memory_after_open",
                                                   "memory_after_queries")},
            "sweep": [{"nprobe": s["nprobe"], "qps_single": 1 / s["single_seconds"],
                       "recall_at_10": recall_at(s["answers"], truth, row_of)} for s in found["sweep"]],
        }
        print("    pss of two processes on one catalogue", flush=True)
        entry["two_processes"] = pss_of(args, catalogues[profile], work / "queries.npy", work)
        result["profiles"][profile] = entry
        print(f"    recall@10 {entry['recall_at_10']:.3f} filtered {entry['filtered_recall_at_10']:.3f} | "
              f"{entry['qps_single']:.1f} q/s single, {entry['qps_batch']:.1f} q/s batched", flush=True)
    if not args.keep:
        for folder in catalogues.values():
            shutil.rmtree(folder, ignore_errors=True)
    return result


def run_real(args, real_path, real_items_csv, out):
    """Catalogues of all real embeddings: recall@10 (500 items searched by their vectors, the item left out)
    and precision@4 by category, for every profile."""
    work = out / "real-catalogues"
    categories = sorted({it.category for it in read_csv(real_items_csv)})
    results, folders = {}, {}
    for profile in args.profiles:
        folders[profile] = work / f"catalogue-{profile}"
        if folders[profile].exists():
            shutil.rmtree(folders[profile])
        print(f"--- real embeddings: {profile}", flush=True)
        build = worker(args, "build", "publish", "--out", folders[profile], "--embeddings", real_path,
                       "--items", real_items_csv, "--categories", *categories, "--profile", profile, threads=2)
        found = worker(args, "precision", "--catalogue", folders[profile], "--embeddings", real_path, "--items",
                       real_items_csv, "--queries", args.p4_queries, threads=2)
        results[profile] = {"build": build, **found}
    if "exact" in results:
        reference = [set(row) for row in results["exact"]["top10"]]
        for found in results.values():
            found["recall_at_10"] = float(np.mean([len(set(a) & b) / len(b)
                                                   for a, b in zip(found["top10"], reference)]))
    for found in results.values():
        found.pop("top10"), found.pop("recall_rows")
    if not args.keep:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    return results


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        real_path, real_items = embed(args.bundle, args.images, args.real_dir)
    except (OSError, ValueError) as error:
        sys.exit(f"error: real embeddings: {error}")
    real = np.load(real_path, allow_pickle=False)
    model = synthetic.fit(real, [it.category for it in real_items], cache_dir=args.real_dir)
    results = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "load": os.getloadavg()},
               "command": " ".join(sys.argv), "synthetic": {
                   "method": " ".join(synthetic.__doc__.split()), "pca_dims": synthetic.PCA_DIMS,
                   "explained_variance": model.explained, "median_nn_distance": model.nn_distance},
               "sizes": []}
    del real
    for size in args.sizes:
        results["sizes"].append(run_size(args, model, real_items, size, out))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.skip_real:
        results["real"] = run_real(args, real_path, Path(args.real_dir) / "items.csv", out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'recall_vs_qps.png'}")


if __name__ == "__main__":
    main()
