"""Milvus paused (slow) or stopped under load: every request gets a 503 with a JSON reason within the response
timeout, the workers stay up (the same pids), and answers come back by themselves once the server is back, with
everything written before the stop still there."""
import os
import signal
import time

import requests

from loadtests.steady_load import SteadyLoad
from tests.conftest import MILVUS_MODEL, MILVUS_TIMEOUT
from tests.fixtures import encode, product_photo

RESPONSE_TIMEOUT = 30  # the archive's responseTimeout (milvus_pair)
RECOVERS_WITHIN = 120  # s after the restart; the time it takes is the benchmark's business


def worker_pids(server):
    described = requests.get(f"{server.urls['management']}/models/{MILVUS_MODEL}",
                             headers=server.headers("management"), timeout=30).json()[0]
    return sorted(w["pid"] for w in described["workers"] if w["status"] == "READY")


def search(server, body, **fields):
    return requests.post(f"{server.urls['inference']}/predictions/{MILVUS_MODEL}", data=body, timeout=90,
                         headers={**server.headers(), "Content-Type": "image/jpeg", **fields})


def wait_for(check, within, what):
    deadline = time.time() + within
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {within} s: {what}")


def assert_unavailable(response, started):
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == 503 and "catalogue engine" in body["error"] and "Milvus" in body["error"], body
    assert time.time() - started < RESPONSE_TIMEOUT


def test_a_paused_then_stopped_milvus_answers_503_and_the_workers_recover_with_the_data(milvus_pair):
    server, milvus, writer = milvus_pair["server"], milvus_pair["milvus"], milvus_pair["writers"][MILVUS_MODEL]
    photo = encode(product_photo("bags", 9500, size=(80, 60)), "JPEG")
    writer.add("before-the-stop", "bags", photo, image="bags/before-the-stop.jpg")
    assert search(server, photo, **{"X-Top-K": "1"}).json()["neighbours"][0]["id"] == "before-the-stop"
    pids, live = worker_pids(server), writer.catalogue.live_count
    assert len(pids) == 2
    load = SteadyLoad(f"{server.urls['inference']}/predictions/{MILVUS_MODEL}",
                      {**server.headers(), "Content-Type": "image/jpeg"}, photo, clients=2, max_seconds=600,
                      timeout=RESPONSE_TIMEOUT + 30).start()
    try:
        wait_for(lambda: len(load.snapshot()) >= 4, 60, "answers under load")
        os.kill(milvus.process.pid, signal.SIGSTOP)  # slow: connections open, nothing answered
        try:
            started = time.time()
            assert_unavailable(search(server, photo), started)
            assert time.time() - started >= MILVUS_TIMEOUT / 2  # it waited for Milvus, then gave up
        finally:
            os.kill(milvus.process.pid, signal.SIGCONT)
        milvus.stop()  # unreachable: connections refused
        started = time.time()
        assert_unavailable(search(server, photo), started)
        by_listing = requests.post(f"{server.urls['inference']}/predictions/{MILVUS_MODEL}", timeout=90,
                                   json={"listing": "before-the-stop", "k": 2}, headers=server.headers())
        assert_unavailable(by_listing, started)
        stopped_at = len(load.snapshot())
        wait_for(lambda: len(load.snapshot()) >= stopped_at + 6, 60, "requests during the stop")
        milvus.start()
        wait_for(lambda: load.snapshot()[-1][0] == 200, RECOVERS_WITHIN, "answers after the restart")
        wait_for(lambda: all(r[0] == 200 for r in load.snapshot()[-4:]), 60, "steady answers after the restart")
    finally:
        results = load.stop()
        if not milvus.running():
            milvus.start()
    statuses = {status for status, *_ in results}
    assert statuses <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses
    for status, _, _, text in results:
        if status == 503:
            assert "catalogue engine" in text, text
    assert worker_pids(server) == pids  # no worker restarted
    answer = search(server, photo, **{"X-Top-K": "1"})
    assert answer.status_code == 200 and answer.json()["neighbours"][0]["id"] == "before-the-stop", answer.text
    by_listing = requests.post(f"{server.urls['inference']}/predictions/{MILVUS_MODEL}", timeout=90,
                               json={"listing": "before-the-stop", "k": 2}, headers=server.headers())
    assert by_listing.status_code == 200, by_listing.text
    assert writer.catalogue.live_count == live
