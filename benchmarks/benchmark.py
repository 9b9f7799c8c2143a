"""In-process against served throughput, one run: (a) the archive's handler on batches of 640x480 JPEGs in a
process of its own; (b) TorchServe under Locust, users growing to saturation: b/a, p50/p95/p99 at a moderate load,
one user's p50 against batch-1, where a lone request's time goes, answer bytes. See docs/performance.md."""
import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

from loadtests.photos import load_photos
from loadtests.run import get_args as loadtest_args
from loadtests.run import run_locust
from serving.build_archive import main as build_archive
from serving.torchserve import ROOT, TorchServe, free_port
from tests.harness import synthetic_bundle
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m benchmarks.benchmark --image-size 225 --batch-size 4 --max-batch-delay 5 --workers 1 \
      --users 1,2,4,8,16 --step-time 60s --out results/benchmark
"""

MODEL = "bench-search"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--image-size", type=int, default=225, help="model input; small values make a quick run")
    p.add_argument("--catalogue-size", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batch-delay", type=int, default=20, help="ms")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--runtime", nargs="*", default=[], help="build_archive runtime flags, e.g. --precision fp16")
    p.add_argument("--mix", default="similar=0.8,embedding=0.2")
    p.add_argument("--inprocess-seconds", type=float, default=20)
    p.add_argument("--users", default="1,2,4,8", help="Locust user counts, growing to saturation")
    p.add_argument("--step-time", default="30s", help="Locust run time per user count")
    p.add_argument("--moderate-fraction", type=float, default=0.5, help="of the saturated rate")
    p.add_argument("--out", default="results/benchmark")
    p.add_argument("--probe-requests", type=int, default=30, help="sequential requests of the lone-request breakdown")
    p.add_argument("--skip-served", action="store_true", help="measure (a) only (no Java or TorchServe needed)")
    return p.parse_args(argv)


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__}


def build(args, tmp, photos):
    bundle = tmp / "bundle"
    synthetic_bundle(bundle, args.image_size, photos[:16], catalogue_size=args.catalogue_size)
    build_archive(["--bundle", str(bundle), "--name", MODEL, "--model-store", str(tmp / "store"), "--batch-size",
                   str(args.batch_size), "--max-batch-delay", str(args.max_batch_delay), "--workers",
                   str(args.workers), *args.runtime])
    return tmp / "store" / f"{MODEL}.mar"


def measure_inprocess(args, archive, tmp):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    command = [sys.executable, "-m", "benchmarks.handler_child", "--archive", str(archive), "--work-dir",
               str(tmp / "inprocess"), "--batch-size", str(args.batch_size), "--seconds", str(args.inprocess_seconds),
               "--mix", args.mix, "--device", device]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the in-process measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def metric_sum(text, name):
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}}\s+(\S+)$", text, flags=re.M))


def lone_request_breakdown(server, photos, count):
    """Sequential similar-items requests, one at a time: where each one's time goes, in ms per request, from
    TorchServe's counters (ts_queue_latency_microseconds: arrival to dispatch to the worker, which includes the
    maxBatchDelay wait of a lone request; ts_inference_latency_microseconds: arrival to answer) and the client."""
    url = f"{server.urls['inference']}/predictions/{MODEL}"
    scrape = lambda: requests.get(f"{server.urls['metrics']}/metrics", timeout=30).text  # noqa: E731
    with requests.Session() as session:
        headers = {**server.headers(), "Content-Type": "image/jpeg"}
        session.post(url, data=photos[0], headers=headers, timeout=120).raise_for_status()
        before, times = scrape(), []
        for i in range(count):
            start = time.perf_counter()
            session.post(url, data=photos[i % len(photos)], headers=headers, timeout=120).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
        after = scrape()
    delta = lambda name: metric_sum(after, name) - metric_sum(before, name)  # noqa: E731
    requests_seen = delta("ts_inference_requests_total") or count
    queue_ms = delta("ts_queue_latency_microseconds") / requests_seen / 1000
    frontend_ms = delta("ts_inference_latency_microseconds") / requests_seen / 1000
    client_ms = statistics.mean(times)
    return {"requests": count, "client_p50_ms": statistics.median(times), "client_mean_ms": client_ms,
            "queue_ms": queue_ms, "worker_round_trip_ms": frontend_ms - queue_ms,
            "http_and_client_ms": client_ms - frontend_ms}


def served_answer_bytes(server, photo):
    url = f"{server.urls['inference']}/predictions/{MODEL}"
    headers = {**server.headers(), "Content-Type": "image/jpeg"}
    return {output: len(requests.post(url, data=photo, headers={**headers, "X-Output": output}, timeout=120).content)
            for output in ("similar", "embedding")}


def locust_step(server, args, out, users, rate=0.0, run_time=None):
    options = loadtest_args(["--host", server.urls["inference"], "--state-dir", str(server.state_dir), "--model",
                             MODEL, "--users", str(users), "--spawn-rate", str(users), "--run-time",
                             run_time or args.step_time, "--mix", args.mix, "--rate", str(rate), "--results-dir",
                             str(out / "locust"), "--name", f"users{users}" + ("-fixed" if rate else "")])
    code, summary, _ = run_locust(options)
    return {"users": users, "rate_per_user": rate, "exit_code": code, **summary}


def measure_served(args, archive, out, photos):
    server = TorchServe(out / "torchserve", model_store=archive.parent,
                        ports={api: free_port() for api in ("inference", "management", "metrics")})
    server.start([archive.name], timeout=600)
    try:
        sweep = [locust_step(server, args, out, int(u)) for u in args.users.split(",")]
        best = max(sweep, key=lambda s: s.get("requests_per_s") or 0)
        users = max(1, best["users"])
        fixed_rate = args.moderate_fraction * best["requests_per_s"] / users
        moderate = locust_step(server, args, out, users, rate=fixed_rate)
        lone = lone_request_breakdown(server, photos, args.probe_requests)
        answer_bytes = served_answer_bytes(server, photos[0])
        (out / "metrics.txt").write_text(requests.get(f"{server.urls['metrics']}/metrics", timeout=30).text)
    finally:
        server.stop()
    return {"sweep": sweep, "saturated": best, "moderate": moderate, "lone_request": lone,
            "answer_bytes": answer_bytes}


def plot(result, path):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    sweep = result["served"]["sweep"]
    x = [s["requests_per_s"] for s in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        ax.plot(x, [s[key] for s in sweep], marker="o", label=key.removesuffix("_ms"))
    for s in sweep:
        ax.annotate(f"{s['users']}u", (s["requests_per_s"], s["p50_ms"]), textcoords="offset points", xytext=(4, 4))
    ax.axvline(result["inprocess"]["images_per_s"], color="grey", linestyle="--", label="in-process (a)")
    ax.set(xlabel="served requests/s", ylabel="latency, ms", title="Latency against throughput as users grow")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(result):
    a = result["inprocess"]
    print(f"(a) in-process, batch {result['settings']['batch_size']}: {a['images_per_s']:.2f} images/s; "
          f"batch 1: {a['batch1_ms']:.1f} ms ({a['device']}); answers {a['answer_bytes']['similar']} B similar, "
          f"{a['answer_bytes']['embedding']} B embedding")
    served = result.get("served")
    if not served:
        return
    for s in served["sweep"]:
        print(f"    users {s['users']:>3}: {s['requests_per_s']:.2f} req/s, p50 {s['p50_ms']} p95 {s['p95_ms']} "
              f"p99 {s['p99_ms']} ms, {s['failures']} failed")
    m, r = served["moderate"], result["ratios"]
    print(f"(b) served at saturation: {served['saturated']['requests_per_s']:.2f} req/s; b/a = {r['b_over_a']:.2f} "
          f"(target >= 0.85)")
    print(f"    moderate load {m['requests_per_s']:.2f} req/s: p50 {m['p50_ms']} p95 {m['p95_ms']} "
          f"p99 {m['p99_ms']} ms")
    print(f"    one user p50 / in-process batch-1 = {r['single_p50_over_batch1']:.2f} (target <= 1.3)")
    lone = served["lone_request"]
    print(f"    a lone request, {lone['requests']} in a row: client p50 {lone['client_p50_ms']:.1f} ms, mean "
          f"{lone['client_mean_ms']:.1f} = queue {lone['queue_ms']:.1f} (maxBatchDelay "
          f"{result['settings']['max_batch_delay']}) + worker round trip {lone['worker_round_trip_ms']:.1f} + "
          f"HTTP and client {lone['http_and_client_ms']:.1f}; lone p50 / batch-1 = "
          f"{r['lone_p50_over_batch1']:.2f}")
    print(f"    answers on the wire: {served['answer_bytes']['similar']} B similar, "
          f"{served['answer_bytes']['embedding']} B embedding")


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos(count=32)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        archive = build(args, Path(tmp), photos)
        result = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
                  "inprocess": measure_inprocess(args, archive, Path(tmp))}
        if not args.skip_served:
            result["served"] = measure_served(args, archive, out, photos)
            sweep, a = result["served"]["sweep"], result["inprocess"]
            result["ratios"] = {
                "b_over_a": result["served"]["saturated"]["requests_per_s"] / a["images_per_s"],
                "single_p50_over_batch1": next(s["p50_ms"] for s in sweep if s["users"] == min(
                    x["users"] for x in sweep)) / a["batch1_ms"],
                "lone_p50_over_batch1": result["served"]["lone_request"]["client_p50_ms"] / a["batch1_ms"]}
    result["seconds"] = time.time() - started
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    if "served" in result:
        plot(result, out / "latency_vs_throughput.png")
    report(result)
    print(f"wrote {out / 'benchmark.json'}")
    failed = [s for s in result.get("served", {}).get("sweep", []) if s["failures"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
