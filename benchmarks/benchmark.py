"""In-process against served throughput, one run per runtime (--runtimes, one after another): (a) the archive's
handler on batches of 640x480 JPEGs in a process of its own; (b) TorchServe under Locust, users growing to
saturation: b/a, p50/p95/p99 at a moderate load, one user's p50 against batch-1, where a lone request's time goes,
answer bytes; a table of the runtimes side by side. See docs/performance.md."""
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
from serving.torchserve import ROOT, TorchServe, free_port, read_archive
from tests.harness import synthetic_bundle
from training.parity_gate import RUNTIME_NAMES
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m benchmarks.benchmark --image-size 225 --batch-size 4 --max-batch-delay 5 --workers 1 \
      --users 1,2,4,8,16 --step-time 60s --out results/benchmark
  python -m benchmarks.benchmark --runtimes torch-fp32,openvino-fp32,openvino-bf16,openvino-int8 \
      --users 1,2,4,8,16 --out results/runtimes
"""

MODEL = "bench-search"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--image-size", type=int, default=225, help="model input; small values make a quick run")
    p.add_argument("--catalogue-size", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=None, help="default: build_archive's for the runtime")
    p.add_argument("--max-batch-delay", type=int, default=None, help="ms; default: build_archive's for the runtime")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--runtimes", default="torch-fp32",
                   help=f"comma-separated, measured one after another: {', '.join(RUNTIME_NAMES[1:])}")
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


def build(args, tmp, photos, runtime="torch-fp32"):
    """The synthetic bundle of `runtime` (its IR made, int8 calibrated on the photos) and its archive."""
    bundle = tmp / "bundle"
    synthetic_bundle(bundle, args.image_size, photos[:16], catalogue_size=args.catalogue_size, runtime=runtime)
    given = [flag for option, value in (("--batch-size", args.batch_size), ("--max-batch-delay", args.max_batch_delay))
             if value is not None for flag in (option, str(value))]
    build_archive(["--bundle", str(bundle), "--name", MODEL, "--model-store", str(tmp / "store"), *given,
                   "--workers", str(args.workers), *args.runtime])
    return tmp / "store" / f"{MODEL}.mar"


def served_settings(archive):
    """batchSize and maxBatchDelay as the archive has them."""
    config = read_archive(archive).config
    return {"batch_size": int(config["batchSize"]), "max_batch_delay": int(config["maxBatchDelay"])}


def measure_inprocess(args, archive, tmp):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    command = [sys.executable, "-m", "benchmarks.handler_child", "--archive", str(archive), "--work-dir",
               str(tmp / "inprocess"), "--batch-size", str(served_settings(archive)["batch_size"]), "--seconds",
               str(args.inprocess_seconds), "--mix", args.mix, "--device", device]
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
    print(f"== {result['runtime']}: batchSize {result['served_settings']['batch_size']}, maxBatchDelay "
          f"{result['served_settings']['max_batch_delay']} ms, {result['settings']['workers']} worker(s)")
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


def measure(args, runtime, out, photos):
    """One runtime: its archive measured in process, then served."""
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = build(args, Path(tmp), photos, runtime)
        result = {"runtime": runtime, "machine": machine(),
                  "settings": {k: v for k, v in vars(args).items() if k != "out"},
                  "served_settings": served_settings(archive), "inprocess": measure_inprocess(args, archive, Path(tmp))}
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
    return result


def summary(results):
    """The runtimes side by side, and each one's served rate against the first's."""
    first = results[0]
    print(f"\n{'runtime':<14} {'batch':>5} {'delay':>5} {'a img/s':>8} {'batch-1 img/s':>13} {'b req/s':>8} "
          f"{'x first':>7} {'1-user p50':>10} {'p99 at half':>11}")
    for result in results:
        a, served = result["inprocess"], result.get("served")
        settings = result["served_settings"]
        row = (f"{result['runtime']:<14} {settings['batch_size']:>5} {settings['max_batch_delay']:>5} "
               f"{a['images_per_s']:>8.1f} {1000 / a['batch1_ms']:>13.1f}")
        if served:
            rate, base = served["saturated"]["requests_per_s"], first["served"]["saturated"]["requests_per_s"]
            one = min(served["sweep"], key=lambda s: s["users"])
            row += (f" {rate:>8.1f} {rate / base:>7.2f} {one['p50_ms']:>8} ms {served['moderate']['p99_ms']:>8} ms")
        print(row)


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    unknown = [name for name in runtimes if name not in RUNTIME_NAMES[1:]]
    if unknown:
        sys.exit(f"error: unknown runtimes {unknown}: choose from {', '.join(RUNTIME_NAMES[1:])}")
    photos = load_photos(count=32)
    results = [measure(args, runtime, out / runtime if len(runtimes) > 1 else out, photos) for runtime in runtimes]
    out.mkdir(parents=True, exist_ok=True)
    if len(runtimes) > 1:
        (out / "runtimes.json").write_text(json.dumps(results, indent=2))
    summary(results)
    print(f"wrote {out}")
    failed = [s for r in results for s in r.get("served", {}).get("sweep", []) if s["failures"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
