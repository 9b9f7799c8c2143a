"""Locust users that post product photos to /predictions/<model>, asking for similar items or the embedding in the
proportions of --mix; a failed request, or a p95 over --max-p95-ms, fails the run. Start it with loadtests.run."""
import itertools
import random
import sys
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtests.mix import parse_mix, schedule  # noqa: E402
from loadtests.photos import load_photos  # noqa: E402
from serving.torchserve import DEFAULT_STATE, TorchServe  # noqa: E402

PHOTOS, AUTH, SCHEDULE = [], {}, []
USER_NUMBERS = itertools.count()
EXPECTED = {"similar": b'"neighbours"', "embedding": b'"embedding"'}  # a field each answer must hold


@events.init_command_line_parser.add_listener
def add_options(parser):
    parser.add_argument("--model", default="visual-search", help="model name in /predictions/<model>")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE), help="TorchServe state folder with key_file.json")
    parser.add_argument("--mix", default="similar=0.8,embedding=0.2", help="answer kinds and their weights")
    parser.add_argument("--top-k", type=int, default=4, help="X-Top-K of the similar-items requests")
    parser.add_argument("--photos", default="", help="folder of images to send (default: synthetic JPEGs)")
    parser.add_argument("--photo-count", type=int, default=32)
    parser.add_argument("--photo-size", default="640x480", help="WxH of the synthetic photos")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s per user; 0 sends back to back")
    parser.add_argument("--max-p95-ms", type=float, default=0.0, help="fail the run above this p95; 0: no bound")


@events.init.add_listener
def set_up(environment, **_):
    options = environment.parsed_options
    if options is None:
        return
    SCHEDULE.extend(schedule(parse_mix(options.mix)))
    AUTH.update(TorchServe(options.state_dir).headers())
    width, height = (int(v) for v in options.photo_size.lower().split("x"))
    PHOTOS.extend(load_photos(options.photos or None, options.photo_count, (width, height)))
    SearchUser.wait_time = constant_throughput(options.rate) if options.rate > 0 else constant(0)


@events.quitting.add_listener
def check_run(environment, **_):
    total, bound = environment.stats.total, environment.parsed_options.max_p95_ms
    p95 = total.get_response_time_percentile(0.95) or 0
    if total.num_requests == 0 or total.num_failures > 0:
        print(f"FAIL: {total.num_failures} of {total.num_requests} requests failed")
        environment.process_exit_code = 1
    elif bound and p95 > bound:
        print(f"FAIL: p95 latency {p95:.0f} ms is over the bound of {bound:.0f} ms")
        environment.process_exit_code = 1


class SearchUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self):
        self.sent = next(USER_NUMBERS)  # where this user starts in the schedule

    @task
    def search(self):
        options = self.environment.parsed_options
        output, self.sent = SCHEDULE[self.sent % len(SCHEDULE)], self.sent + 1
        headers = {**AUTH, "Content-Type": "image/jpeg", "X-Output": output, "X-Top-K": str(options.top_k)}
        with self.client.post(f"/predictions/{options.model}", data=random.choice(PHOTOS), headers=headers,
                              name=output, catch_response=True) as response:
            if response.status_code == 200 and EXPECTED[output] not in (response.content or b""):
                response.failure(f"200 without {EXPECTED[output].decode()} in the answer")
