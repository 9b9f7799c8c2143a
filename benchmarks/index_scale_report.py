"""Tables and the recall-against-QPS plot of benchmarks.index_scale, from its results.json.

    python -m benchmarks.index_scale_report results/index_scale      # rewrite table.md and the plot
"""
import argparse
import json
from pathlib import Path

from visual_search.catalogue.index import EMBEDDING_DIM, ivf_lists, plan_index
from visual_search.cli import HelpFormatter

MB = 1 << 20


def memory_growth(entry, after):
    """(private bytes, file-backed resident bytes) that opening (after="memory_after_open") or opening and
    querying (after="memory_after_queries") added to the process."""
    before, now = entry["memory"]["memory_before_open"], entry["memory"][after]
    private = now["anonymous"] - before["anonymous"]
    resident_file = (now["rss"] - now["anonymous"]) - (before["rss"] - before["anonymous"])
    return private, resident_file


def index_bytes(entry):
    files = entry["build"]["files"]
    return files["index.faiss"] + files.get("lists.npy", 0)


def build_table(results):
    lines = ["| items | profile | factory, search | build s (peak RSS) | index B/item | private B/item after open "
             "| after the queries: file-backed resident, private | PSS of 2 workers (RSS) | disk B/item, all files "
             "| update +1% -0.1% s (of build) | open s, first query ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in results["sizes"]:
        n = size["size"]
        for name, entry in size["profiles"].items():
            build, update = entry["build"], entry["update_1pct"]
            private_open, _ = memory_growth(entry, "memory_after_open")
            private, resident = memory_growth(entry, "memory_after_queries")
            disk = sum(build["files"].values()) / n
            pss = " + ".join(f"{p['pss'] / MB:,.0f}" for p in entry["two_processes"])
            rss = " + ".join(f"{p['rss'] / MB:,.0f}" for p in entry["two_processes"])
            params = ", ".join(f"{k} {v}" for k, v in build["search"].items())
            lines.append(
                f"| {n:,} | {name} | `{build['factory']}` {params} | {build['seconds']:.0f} "
                f"({build['peak_rss'] / MB / 1024:.1f} GiB) | {index_bytes(entry) / n:,.0f} "
                f"| {private_open / n:,.0f} | {resident / n:,.0f} B/item, {private / MB:,.0f} MB "
                f"| {pss} MB ({rss}) | {disk:,.0f} | {update['seconds']:.1f} "
                f"({100 * update['seconds'] / build['seconds']:.0f}%) | {entry['open_seconds']:.2f}, "
                f"{1000 * entry.get('first_query_seconds', float('nan')):.0f} |")
    return "\n".join(lines)


def speed_table(results):
    lines = ["| items | profile | recall@10 | q/s one at a time (x Flat) | q/s in batches of 64 (x Flat) "
             "| filtered recall@10, exactly k | filtered q/s one at a time (x Flat) | filtered q/s batched (x Flat) |",
             "|---|---|---|---|---|---|---|---|"]
    for size in results["sizes"]:
        flat = size["profiles"].get("exact")
        for name, e in size["profiles"].items():
            def ratio(key, e=e, flat=flat, name=name):
                return f" ({e[key] / flat[key]:,.0f}x)" if flat is not None and name != "exact" else ""
            lines.append(
                f"| {size['size']:,} | {name} | {e['recall_at_10']:.3f} | {e['qps_single']:,.1f}{ratio('qps_single')} "
                f"| {e['qps_batch']:,.1f}{ratio('qps_batch')} | {e['filtered_recall_at_10']:.3f}, "
                f"{'yes' if e['filtered_exactly_k'] else 'NO'} | {e['qps_single_filtered']:,.1f}"
                f"{ratio('qps_single_filtered')} | {e['qps_batch_filtered']:,.1f}{ratio('qps_batch_filtered')} |")
    return "\n".join(lines)


def real_table(results):
    real = results.get("real")
    if not real:
        return ""
    categories = sorted(next(iter(real.values()))["precision_at_4"])
    lines = ["| profile | recall@10 vs Flat | precision@4 | " + " | ".join(categories) + " |",
             "|---|---|---|" + "---|" * len(categories)]
    for name, e in real.items():
        lines.append(f"| {name} | {e.get('recall_at_10', float('nan')):.3f} | {e['overall']:.4f} | "
                     + " | ".join(f"{e['precision_at_4'][c]:.3f}" for c in categories) + " |")
    return "\n".join(lines)


def work_units(profile, count):
    """Distance computations x dimension per query under the profile's plan for `count` items."""
    plan = plan_index(count, profile=profile)
    if profile == "exact":
        return count * EMBEDDING_DIM
    nlist = ivf_lists(count)
    dims = 256 if plan.factory.startswith("PCA256") else EMBEDDING_DIM
    coarse = nlist * dims if "_HNSW" not in plan.factory else 64 * 32 * dims
    scanned = plan.search["nprobe"] * count / nlist
    return coarse + scanned * dims + 10 * plan.search.get("k_factor", 1) * EMBEDDING_DIM


def paper_table(results, targets=(10_000_000, 100_000_000)):
    """Memory from the measured bytes per item at the largest size; speed scaled from its measured single-query
    time by the work per query under each size's plan."""
    size = max(results["sizes"], key=lambda s: s["size"])
    n = size["size"]
    lines = [f"Scaled from the {n:,}-item run: RAM = index bytes per item x items (the page cache the index needs "
             f"to serve at full speed); disk adds the stored vectors (8 KiB per item), items and bitmaps; "
             f"queries/s = measured single-query rate x (work per query at {n:,}) / (work at the target), where "
             f"work = coarse-quantizer distances + nprobe x average list length, times the dimension.",
             "",
             "| items | profile | factory, search | RAM (index) | disk, all files | expected q/s one at a time |",
             "|---|---|---|---|---|---|"]
    for target in targets:
        for name, e in size["profiles"].items():
            plan = plan_index(target, profile=name)
            ram = index_bytes(e) / n * target
            disk = sum(e["build"]["files"].values()) / n * target
            qps = e["qps_single"] * work_units(name, n) / work_units(name, target)
            params = ", ".join(f"{k} {v}" for k, v in plan.search.items())
            lines.append(f"| {target:,} | {name} | `{plan.factory}` {params} | {ram / 2 ** 30:,.0f} GiB | "
                         f"{disk / 2 ** 30:,.0f} GiB | {qps:,.2f} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    for size in results["sizes"]:
        for name, e in size["profiles"].items():
            label = f"{name}, {size['size']:,}"
            if e["sweep"]:
                xs = [s["qps_single"] for s in e["sweep"]]
                ys = [s["recall_at_10"] for s in e["sweep"]]
                probes = f"nprobe {e['sweep'][0]['nprobe']}..{e['sweep'][-1]['nprobe']}"
                ax.plot(xs, ys, marker="o", label=f"{label} ({probes})")
                for s in e["sweep"]:
                    ax.annotate(str(s["nprobe"]), (s["qps_single"], s["recall_at_10"]), fontsize=7)
            ax.scatter([e["qps_single"]], [e["recall_at_10"]], marker="*", s=120, zorder=3,
                       label=f"{label}, stored parameters")
    ax.set_xscale("log")
    ax.set_xlabel("queries/s, one at a time (this machine, shared)")
    ax.set_ylabel("recall@10 against exact search (synthetic)")
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BUILD_NOTE = ("build s: the accurate profile is published from the embeddings file (items, vectors, index, "
              "checksums); the others are re-indexed from its folder (index only). Update: a new version adding 1% "
              "and removing 0.1% of the items, against that build. Index B/item: index.faiss and lists.npy, what "
              "must stay in the page cache to serve at full speed. Private: anonymous memory the open added. "
              "After the queries: file-backed pages mapped (the index, memory-mapped; stored vectors are read "
              "with pread, never mapped) and private memory. PSS: two processes that opened the same folder and "
              "ran the same queries. First query: the first search after open, before any warm-up; speeds below "
              "are measured after one pass over the queries.")


def write_report(results, out):
    out = Path(out)
    text = ["## Build, size and memory", "", BUILD_NOTE, "", build_table(results), "",
            "## Recall and speed (synthetic catalogues)", "", speed_table(results), ""]
    if results.get("real"):
        text += ["## Real embeddings: all 70,000 Fashion-MNIST photos, each item searched by its own vector", "",
                 real_table(results), ""]
    text += ["## On paper: 10M and 100M items", "", paper_table(results), ""]
    (out / "table.md").write_text("\n".join(text))
    plot(results, out / "recall_vs_qps.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("folder", nargs="?", default="results/index_scale")
    args = p.parse_args(argv)
    write_report(json.loads((Path(args.folder) / "results.json").read_text()), args.folder)
    print((Path(args.folder) / "table.md").read_text())


if __name__ == "__main__":
    main()
