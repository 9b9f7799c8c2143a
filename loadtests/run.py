"""Run the Locust suite headless against a TorchServe and write Locust's CSV and HTML reports.

    python -m loadtests.run --host http://127.0.0.1:8080 --state-dir .torchserve --model visual-search \
        --users 8 --spawn-rate 4 --run-time 60s --mix similar=0.8,embedding=0.2 --max-p95-ms 2000

Exits non-zero when any request failed or the p95 latency passed --max-p95-ms. Loopback hosts only, unless
--allow-remote.
"""
import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

from serving.torchserve import add_target_arguments, refuse_remote

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def run_locust(args):
    """Runs Locust once; returns (exit code, summary dict, report prefix)."""
    refuse_remote(args)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    prefix = results / args.name
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", args.host,
               "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time,
               "--stop-timeout", "30", "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
               "--loglevel", "WARNING", "--model", args.model, "--state-dir", str(args.state_dir),
               "--mix", args.mix, "--rate", str(args.rate), "--max-p95-ms", str(args.max_p95_ms)]
    if args.photos:
        command += ["--photos", args.photos]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    stats = Path(f"{prefix}_stats.csv")
    return code, read_summary(stats) if stats.exists() else {}, prefix


def main(argv=None):
    code, summary, prefix = run_locust(get_args(argv))
    print(f"summary: {summary}\nreports: {prefix}_stats.csv, {prefix}.html")
    return code


if __name__ == "__main__":
    sys.exit(main())
