"""FAISS (`accurate`, memory-mapped) against Milvus Lite (IVF_SQ8, then HNSW on the same rows) through the
catalogue's answer(), the call the handler's service makes: single-query and batched q/s, p50 and p99, recall@10
against exact search, publish and load time, memory (the FAISS process; the Milvus Lite server's RSS). Milvus Lite
is one process on this host, not a cluster. The rows are synthetic (a clustered mixture); docs/milvus.md has the
figures and says how far they carry."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from visual_search.catalogue.search import SearchRequest
from visual_search.catalogue.vectors import RowReader, SegmentWriter, l2_normalize
from visual_search.cli import HelpFormatter
from visual_search.items import Item, read_csv, write_csv

USAGE = """examples:
  python -m benchmarks.milvus_engine --size 100000
  python -m benchmarks.milvus_engine --size 1000000 --out results/milvus_engine
"""
CATEGORIES = tuple(f"c{i}" for i in range(10))
CLUSTERS, SPREAD_DIMS = 2000, 256
SPREAD = 0.15  # noise scale: rows stay nearer their own centre than any other (a wider one is noise, not neighbours)
BATCH = 16  # requests per answer() call, batched


def synthetic_rows(count, seed, chunk=8192):
    """Unit rows around CLUSTERS centres, spread in a random 256-d subspace with a decaying spectrum."""
    rng = np.random.default_rng(0)
    centres = l2_normalize(rng.standard_normal((CLUSTERS, 2048), dtype=np.float32))
    basis = rng.standard_normal((SPREAD_DIMS, 2048), dtype=np.float32) / np.sqrt(2048)
    basis *= (SPREAD / np.sqrt(1 + np.arange(SPREAD_DIMS)))[:, None].astype(np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        which = rng.integers(0, CLUSTERS, n)
        yield which, l2_normalize(centres[which] + rng.standard_normal((n, SPREAD_DIMS), dtype=np.float32) @ basis)


def write_rows(count, path, seed):
    writer, items, row = SegmentWriter(path, count), [], 0
    for which, chunk in synthetic_rows(count, seed):
        writer.write(chunk)
        for cluster in which:
            category = CATEGORIES[cluster % len(CATEGORIES)]
            items.append(Item(f"s{row:08d}", category, f"{category}/s{row:08d}.jpg"))
            row += 1
    writer.close()
    return items


def exact_top(path, queries, k=10, chunk=32_768):
    """Exact top-k row numbers of `queries` over an .npy of rows, read in chunks."""
    reader = RowReader(path)
    best_d = np.full((len(queries), k), np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(reader), chunk):
        rows = reader.rows(start, min(start + chunk, len(reader)))
        d = (rows ** 2).sum(axis=1)[None, :] - 2 * queries @ rows.T
        all_d = np.concatenate([best_d, d], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(rows)), d.shape)], axis=1)
        top = np.argsort(all_d, axis=1)[:, :k]
        best_d, best_i = np.take_along_axis(all_d, top, 1), np.take_along_axis(all_i, top, 1)
    reader.close()
    return best_i


def measure(catalogue, queries, single, process=None):
    """Latencies of `single` queries one at a time, q/s of batches of BATCH, the top-10 ids of every query."""
    answer = lambda rows: catalogue.answer([SearchRequest(k=10, vector=q) for q in rows])  # noqa: E731
    answer(queries[:1])  # warm-up
    times = []
    for q in queries[:single]:
        started = time.perf_counter()
        answer(q[None, :])
        times.append(time.perf_counter() - started)
    found, started = [], time.perf_counter()
    for start in range(0, len(queries), BATCH):
        found += [[int(n.id[1:]) for n in hits.neighbours] for hits in answer(queries[start:start + BATCH])]
    batch_seconds = time.perf_counter() - started
    result = {"qps_single": len(times) / sum(times), "p50_ms": 1000 * float(np.percentile(times, 50)),
              "p99_ms": 1000 * float(np.percentile(times, 99)), "qps_batched": len(queries) / batch_seconds,
              "found": found}
    if process is not None:
        result["rss_bytes"] = process.memory_info().rss
    return result


def recall(found, truth):
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth.tolist())]))


def faiss_child(folder, queries_path, single):
    """In a fresh process: open the folder memory-mapped, measure, print JSON."""
    from visual_search.catalogue import open_catalogue  # noqa: PLC0415

    me = psutil.Process()
    before = me.memory_info().rss
    started = time.perf_counter()
    catalogue = open_catalogue(folder, mmap=True)
    load = time.perf_counter() - started
    result = measure(catalogue, np.load(queries_path), single, me)
    print(json.dumps({**result, "load_seconds": load, "rss_before_open": before}))


def measure_faiss(args, work, embeddings, items, queries_path):
    from visual_search.catalogue import publish_catalogue  # noqa: PLC0415

    folder = work / "faiss-accurate"
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    publish_catalogue(folder, embeddings, items, categories=list(CATEGORIES), profile="accurate", progress=False)
    publish = time.perf_counter() - started
    line = [sys.executable, "-m", "benchmarks.milvus_engine", "--faiss-child", str(folder), "--queries-file",
            str(queries_path), "--single", str(args.single)]
    done = subprocess.run(line, stdout=subprocess.PIPE, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return folder, {"publish_seconds": publish, **json.loads(done.stdout.strip().splitlines()[-1])}


def measure_milvus(args, work, folder, queries):
    from tests.milvus_server import MilvusLite  # noqa: PLC0415
    from training.publish_milvus import index_plan, publish_folder  # noqa: PLC0415
    from visual_search.catalogue.milvus import IDENTITY_PROPERTY, MilvusSettings, open_collection  # noqa: PLC0415

    data = work / "milvus-data"
    shutil.rmtree(data, ignore_errors=True)
    server = MilvusLite(data).start()
    results = {}
    try:
        process = psutil.Process(server.process.pid)
        settings = MilvusSettings(server.uri, "bench", timeout=600.0)
        results["server_rss_empty"] = process.memory_info().rss
        started = time.perf_counter()
        publish_folder(settings, folder, profile="accurate", progress=True)
        results["publish_ivf_sq8_seconds"] = time.perf_counter() - started
        hnsw = index_plan(args.size, "accurate", hnsw=True)
        for name, index, search in (("IVF_SQ8", None, None), ("HNSW", *hnsw)):
            if index is not None:  # the same rows, indexed again
                client = open_collection(settings).client
                identity = json.loads(client.describe_collection("bench")["properties"][IDENTITY_PROPERTY])
                started = time.perf_counter()
                client.release_collection("bench")
                client.drop_index("bench", "vector")
                params = client.prepare_index_params()
                params.add_index(field_name="vector", index_type="HNSW", metric_type="L2", params=index["params"])
                client.create_index("bench", params, timeout=7200)
                client.load_collection("bench", timeout=7200)
                results["index_hnsw_seconds"] = time.perf_counter() - started
                client.alter_collection_properties("bench", properties={IDENTITY_PROPERTY: json.dumps(
                    {**identity, "index": index, "search": search})})
                client.close()
            started = time.perf_counter()
            catalogue = open_collection(settings)
            load = time.perf_counter() - started
            measured = measure(catalogue, queries, args.single)
            results[name] = {**measured, "load_seconds": load, "server_rss": process.memory_info().rss,
                             "data_dir_bytes": sum(p.stat().st_size for p in data.rglob("*") if p.is_file())}
            catalogue.close()
    finally:
        server.stop()
    return results


def markdown_table(result):
    """The figures of one run as docs/milvus.md's table."""
    faiss, milvus = result["faiss_accurate"], result["milvus_lite"]
    rows = [("FAISS `accurate` (IVF,SQ8), memory-mapped", faiss, faiss["publish_seconds"],
             f"{faiss['rss_bytes'] / 2**20:,.0f} MiB worker RSS"),
            ("Milvus Lite IVF_SQ8", milvus["IVF_SQ8"], milvus["publish_ivf_sq8_seconds"],
             f"{milvus['IVF_SQ8']['server_rss'] / 2**20:,.0f} MiB server RSS"),
            ("Milvus Lite HNSW (M 16), same rows", milvus["HNSW"], milvus["index_hnsw_seconds"],
             f"{milvus['HNSW']['server_rss'] / 2**20:,.0f} MiB server RSS")]
    lines = ["| engine | q/s single | q/s batched (16) | p50 ms | p99 ms | recall@10 | publish s | load s | memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry, publish, memory in rows:
        lines.append(f"| {name} | {entry['qps_single']:.1f} | {entry['qps_batched']:.1f} | {entry['p50_ms']:.1f} | "
                     f"{entry['p99_ms']:.1f} | {entry['recall_at_10']:.3f} | {publish:.0f} | "
                     f"{entry['load_seconds']:.2f} | {memory} |")
    return "\n".join(lines)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    p.add_argument("--threads", type=int, default=2, help="FAISS threads")
    p.add_argument("--out", default="results/milvus_engine")
    p.add_argument("--keep", action="store_true", help="keep the catalogue folder and Milvus data (large)")
    p.add_argument("--faiss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.faiss_child:
        return faiss_child(args.faiss_child, args.queries_file, args.single)
    out = Path(args.out)
    work = out / f"n{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    embeddings, items_csv, queries_path = work / "embeddings.npy", work / "items.csv", work / "queries.npy"
    if not embeddings.is_file():
        write_csv(write_rows(args.size, embeddings, seed=args.size), items_csv)
    items = read_csv(items_csv)
    queries = np.concatenate([chunk for _, chunk in synthetic_rows(args.queries, seed=args.size + 1)])
    np.save(queries_path, queries)
    truth = exact_top(embeddings, queries)
    print(f"=== {args.size} items: FAISS accurate, memory-mapped", flush=True)
    folder, faiss_result = measure_faiss(args, work, embeddings, items, queries_path)
    print(f"=== {args.size} items: Milvus Lite server", flush=True)
    milvus_result = measure_milvus(args, work, folder, queries)
    result = {"size": args.size, "queries": args.queries, "single": args.single, "batch": BATCH,
              "faiss_threads": args.threads, "cpus": os.cpu_count(), "faiss_accurate": faiss_result,
              "milvus_lite": milvus_result}
    for entry in (faiss_result, milvus_result["IVF_SQ8"], milvus_result["HNSW"]):
        entry["recall_at_10"] = recall(entry.pop("found"), truth)
    (out / f"milvus_engine-{args.size}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(markdown_table(result))
    if not args.keep:
        shutil.rmtree(work)
    return result


if __name__ == "__main__":
    main()
