"""Run the web front in the background beside TorchServe (what `make serve` and `make stop` use); its pid file and
log are web.pid and web.log in TorchServe's state folder. Options after the action are those of `python -m web`."""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serving.torchserve import ROOT
from visual_search.cli import HelpFormatter
from web.app import get_args as app_args

PID_FILE, LOG_FILE = "web.pid", "web.log"


USAGE = """examples:
  python -m web.service start [--images DIR] [--port 8090] ...
  python -m web.service status
  python -m web.service stop
"""

def running_pid(state_dir):
    """The pid of the front started from `state_dir`, if it still runs (and is still ours)."""
    try:
        pid = int((Path(state_dir) / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"web" in cmdline else None


def port_taken(host, port):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def start(options, argv):
    state_dir = Path(options.state_dir)
    pid = running_pid(state_dir)
    if pid:
        sys.exit(f"error: the web front already runs (pid {pid}); stop it first (make stop)")
    if not Path(options.images).is_dir():
        sys.exit(f"error: the catalogue image folder {options.images} does not exist (run make demo, or pass "
                 f"--images)")
    if port_taken(options.host, options.port):
        sys.exit(f"error: {options.host}:{options.port} is in use: pass another --port")
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOG_FILE, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "web", *argv], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    (state_dir / PID_FILE).write_text(f"{process.pid}\n")
    host = f"[{options.host}]" if ":" in options.host else options.host
    url = f"http://{host}:{options.port}/"
    deadline = time.time() + 30
    while time.time() < deadline:
        if process.poll() is not None:
            tail = "\n".join((state_dir / LOG_FILE).read_text(errors="replace").splitlines()[-15:])
            sys.exit(f"error: the web front exited at start-up (status {process.returncode}):\n{tail}")
        try:
            if httpx.get(f"{url}healthz", timeout=2).status_code == 200:
                print(f"search page: {url}  (log {state_dir / LOG_FILE}; stop with make stop)", flush=True)
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    sys.exit(f"error: the web front did not answer at {url} within 30 s; see {state_dir / LOG_FILE}")


def stop(state_dir):
    pid = running_pid(state_dir)
    if not pid:
        print("web front not running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 15
    while running_pid(state_dir) and time.time() < deadline:
        time.sleep(0.2)
    if running_pid(state_dir):
        os.kill(pid, signal.SIGKILL)
    (Path(state_dir) / PID_FILE).unlink(missing_ok=True)
    print("web front stopped")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m web.service", description=__doc__, epilog=USAGE,
                                     formatter_class=HelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    action, rest = parser.parse_known_args(argv)
    options = app_args(rest)  # the front's own options, checked here before it starts
    if action.action == "start":
        start(options, rest)
    elif action.action == "stop":
        stop(options.state_dir)
    else:
        pid = running_pid(options.state_dir)
        print(f"web front running, pid {pid}" if pid else "web front not running")
        sys.exit(0 if pid else 3)


if __name__ == "__main__":
    main()
