"""Run the Locust suite headless against a TorchServe and write its CSV, HTML and JSON reports; exits non-zero when a
request failed or the p95 passed --max-p95-ms. Loopback hosts only, unless --allow-remote."""
import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from loadtests.target import add_target_arguments, refuse_remote
from serving.torchserve import ROOT
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m loadtests.run --host http://127.0.0.1:8080 --users 8 --spawn-rate 4 --run-time 60s --max-p95-ms 2000
"""

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    add_target_arguments(p)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--spawn-rate", type=float, default=2)
    p.add_argument("--run-time", default="30s", help="Locust duration: 20s, 2m, ...")
    p.add_argument("--mix", default="similar=0.8,embedding=0.2")
    p.add_argument("--rate", type=float, default=0.0, help="requests/s per user; 0 sends back to back")
    p.add_argument("--max-p95-ms", type=float, default=0.0, help="0: no latency bound")
    p.add_argument("--photos", default="", help="folder of images to send (default: synthetic 640x480 JPEGs)")
    p.add_argument("--results-dir", default=str(ROOT / "results" / "loadtest"))
    p.add_argument("--name", default="locust", help="prefix of the report files")
    return p.parse_args(argv)


def read_summary(stats_csv):
    """The Aggregated row of Locust's <prefix>_stats.csv: requests, failures, throughput, percentiles in ms."""
    with open(stats_csv, newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    number = lambda key: float(row[key]) if row[key] not in ("", "N/A") else None  # noqa: E731
    return {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "requests_per_s": number("Requests/s"), "p50_ms": number("50%"), "p95_ms": number("95%"),
            "p99_ms": number("99%"), "mean_ms": number("Average Response Time")}


def read_counts(prefix):
    """{request name: {"requests": n, "failures": n}} from <prefix>.json, the run's final stats."""
    entries = json.loads(Path(f"{prefix}.json").read_text())
    return {e["name"]: {"requests": e["num_requests"], "failures": e["num_failures"]} for e in entries}


def percentile(response_times, fraction):
    """Locust's own rule over its {rounded ms: count} histogram: the smallest time that covers `fraction`."""
    total, seen = sum(response_times.values()), 0
    for ms in sorted(response_times):
        seen += response_times[ms]
        if seen >= fraction * total:
            return float(ms)
    return None


def timespan_seconds(text):
    """Locust's --run-time ("90s", "2m", "1h30m") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)\s*([hms])", text.lower())
    if not parts:
        return float(text)
    return float(sum(int(n) * units[u] for n, u in parts))


def read_final_summary(prefix, seconds=None):
    """The same summary as read_summary, from <prefix>.json (complete, unlike the CSV of a short run); the rate
    is over `seconds`, the run time, when given."""
    entries = json.loads(Path(f"{prefix}.json").read_text())
    times, requests, failures, first, last, total_ms = {}, 0, 0, None, None, 0
    for e in entries:
        for ms, n in e["response_times"].items():
            times[float(ms)] = times.get(float(ms), 0) + n
        requests, failures, total_ms = requests + e["num_requests"], failures + e["num_failures"], \
            total_ms + e["total_response_time"]
        first = min(filter(None, (first, e["start_time"])), default=None)
        last = max(filter(None, (last, e["last_request_timestamp"])), default=None)
    seconds = seconds or ((last - first) if first and last and last > first else None)
    return {"requests": requests, "failures": failures,
            "requests_per_s": requests / seconds if seconds else None,
            "p50_ms": percentile(times, 0.5), "p95_ms": percentile(times, 0.95), "p99_ms": percentile(times, 0.99),
            "mean_ms": total_ms / requests if requests else None}


def run_locust(args):
    """Runs Locust once; returns (exit code, summary dict, report prefix)."""
    refuse_remote(args)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    prefix = results / args.name
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", args.host,
               "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time,
               "--stop-timeout", "30", "--csv", str(prefix), "--html", f"{prefix}.html", "--json-file", str(prefix),
               "--only-summary",
               "--loglevel", "WARNING", "--model", args.model, "--state-dir", str(args.state_dir),
               "--mix", args.mix, "--rate", str(args.rate), "--max-p95-ms", str(args.max_p95_ms)]
    if args.photos:
        command += ["--photos", args.photos]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    if Path(f"{prefix}.json").exists():
        return code, read_final_summary(prefix, timespan_seconds(args.run_time)), prefix
    stats = Path(f"{prefix}_stats.csv")
    return code, read_summary(stats) if stats.exists() else {}, prefix


def main(argv=None):
    code, summary, prefix = run_locust(get_args(argv))
    print(f"summary: {summary}\nreports: {prefix}_stats.csv, {prefix}.html")
    return code


if __name__ == "__main__":
    sys.exit(main())
