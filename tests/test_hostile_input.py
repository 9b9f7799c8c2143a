"""What a hostile or careless client sends, through a real TorchServe: odd bytes in every parameter and channel get
their own 4xx, the requests batched with them their answers, and the worker stays the same process."""
import http.client
import json
import uuid
from urllib.parse import quote, urlparse

import requests

from tests.conftest import MODEL_NAME
from tests.test_serving import batches_between, concurrently, photo_bytes, predict, scrape

PARAMETERS = {"output": "X-Output", "k": "X-Top-K", "category": "X-Category", "exclude": "X-Exclude",
              "listing": "X-Listing"}
# Byte strings as they leave the client: UTF-8, ISO-8859-1, control characters, long values.
ODD_BYTES = {
    "utf-8 accent": "café".encode(),
    "latin-1 accent": "café".encode("latin-1"),
    "full-width digit": "５".encode(),
    "300 latin-1 0xFF": b"\xff" * 300,
    "300 utf-8 y-umlaut": "ÿ".encode() * 300,
    "control characters": b"a\x01b\x7fc\x1b[31m",
    "tab and bell": b"\t\x07",
    "invalid utf-8": b"\xc3\x28\xa0\xa1",
    "long ascii": b"x" * 8000,
    "emoji": "👜".encode(),
}
QUERY_BYTES = 1000
ODD_JSON = [*(value.decode("utf-8", "surrogateescape") for value in ODD_BYTES.values()),
            "\ud800", "a\x00b", ["\ud83d"], {"nested": 1}, -1, 10 ** 30, 1.5, None, [], "é" * 5000]


def worker_pid(server):
    response = requests.get(f"{server.urls['management']}/models/{MODEL_NAME}", headers=server.headers("management"),
                            timeout=30)
    response.raise_for_status()
    workers = response.json()[0]["workers"]
    assert len(workers) == 1 and workers[0]["status"] == "READY", workers
    return int(workers[0]["pid"])


def raw_post(server, path, body, headers, timeout=30):
    """(status, answer) of a POST whose header values go on the wire as the given bytes, or (None, reason) when
    no answer came in time."""
    address = urlparse(server.urls["inference"])
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    try:
        connection.putrequest("POST", path)
        for name, value in {**server.headers(), "Content-Length": str(len(body)), **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        text = response.read()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text[:300]
    except (OSError, http.client.HTTPException) as error:
        return None, repr(error)
    finally:
        connection.close()


def multipart(fields):
    """A multipart/form-data body of raw byte fields, and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, (value, content_type) in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        head += '; filename="photo.jpg"' if name == "image" else ""
        head += f"\r\nContent-Type: {content_type}" if content_type else ""
        parts.append(head.encode() + b"\r\n\r\n" + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def hostile_request(server, parameter, channel, value):
    """A call that sends `value` (bytes, or a JSON value for the json channel) as `parameter` in `channel`."""
    photo = photo_bytes(seed=5)
    path = f"/predictions/{MODEL_NAME}"
    if channel == "header":
        return lambda: raw_post(server, path, photo, {"Content-Type": "image/jpeg", PARAMETERS[parameter]: value})
    if channel == "form":
        body, content_type = multipart({"image": (photo, "image/jpeg"), parameter: (value, None)})
        return lambda: raw_post(server, path, body, {"Content-Type": content_type})
    if channel == "query":  # the frontend refuses request lines over 4096 bytes itself (see the test below)
        query = quote(value[:QUERY_BYTES], safe="")
        return lambda: raw_post(server, f"/models/{MODEL_NAME}/invoke?{parameter}={query}", photo,
                                {"Content-Type": "image/jpeg"})
    import base64
    body = json.dumps({"image": base64.b64encode(photo).decode(), parameter: value}).encode()
    return lambda: raw_post(server, path, body, {"Content-Type": "application/json"})


def good_request(server):
    return lambda: raw_post(server, f"/predictions/{MODEL_NAME}", photo_bytes(seed=6), {"Content-Type": "image/jpeg"})


def test_the_issue_s_two_curl_calls_get_a_4xx_and_the_worker_survives(torchserve):
    pid = worker_pid(torchserve)
    for header in ({"X-Category": "café".encode()}, {"X-Top-K": "５".encode()}, {"X-Top-K": b"\xff" * 300},
                   {"X-Output": b"\xff" * 300}):
        status, answer = raw_post(torchserve, f"/predictions/{MODEL_NAME}", photo_bytes(),
                                  {"Content-Type": "image/jpeg", **header})
        assert status == 400, (header, status, answer)
        assert answer["status"] == 400 and answer["error"], answer
        assert raw_post(torchserve, f"/predictions/{MODEL_NAME}", photo_bytes(), {"Content-Type": "image/jpeg"}
                        )[0] == 200
    assert worker_pid(torchserve) == pid


def test_a_hostile_header_in_a_batch_fails_only_its_own_request(torchserve):
    pid = worker_pid(torchserve)
    before = scrape(torchserve)
    calls = [hostile_request(torchserve, "category", "header", b"\xff" * 300), good_request(torchserve),
             good_request(torchserve), good_request(torchserve)]
    answers = concurrently(calls)
    assert batches_between(before, scrape(torchserve)) == (1, 4), "the 4 requests did not share one batch"
    assert [status for status, _ in answers] == [400, 200, 200, 200], answers
    assert all(len(answer["neighbours"]) == 4 for _, answer in answers[1:])
    assert worker_pid(torchserve) == pid


def test_odd_bytes_in_every_parameter_and_channel_get_4xx_and_never_stop_the_worker(torchserve):
    pid = worker_pid(torchserve)
    cases = [(parameter, channel, value) for parameter in PARAMETERS for channel in ("header", "form", "query")
             for value in ODD_BYTES.values()]
    cases += [(parameter, "json", value) for parameter in PARAMETERS for value in ODD_JSON]
    outcomes = []
    for start in range(0, len(cases), 2):  # two (odd, good) pairs at a time fill a batch of 4
        pairs = cases[start:start + 2]
        calls = [call for case in pairs for call in (hostile_request(torchserve, *case), good_request(torchserve))]
        for case, (odd, good) in zip(pairs, zip(*[iter(concurrently(calls, stagger=0.005))] * 2)):
            outcomes.append((case, odd, good))
    unanswered = [(case[:2], odd) for case, odd, good in outcomes if odd[0] is None or good[0] is None]
    server_errors = [(case[:2], odd) for case, odd, good in outcomes if (odd[0] or 0) >= 500 or (good[0] or 0) >= 500]
    good_failed = [(case[:2], good) for case, odd, good in outcomes if good[0] != 200]
    assert not unanswered, unanswered[:5]
    assert not server_errors, server_errors[:5]
    assert not good_failed, good_failed[:5]
    for case, (status, answer), _ in outcomes:  # what is refused is refused with a JSON reason
        if status != 200:
            assert 400 <= status < 500 and isinstance(answer, dict) and answer.get("error"), (case[:2], answer)
    assert worker_pid(torchserve) == pid


def test_a_request_line_over_the_frontend_s_limit_gets_its_400(torchserve):
    status, answer = raw_post(torchserve, f"/models/{MODEL_NAME}/invoke?exclude={'x' * 5000}", b"", {})
    assert status == 400 and answer["code"] == 400, answer
    assert raw_post(torchserve, f"/predictions/{MODEL_NAME}", photo_bytes(), {"Content-Type": "image/jpeg"})[0] == 200


def test_a_utf8_category_in_a_header_reads_as_it_does_in_json(torchserve):
    by_header = raw_post(torchserve, f"/predictions/{MODEL_NAME}", photo_bytes(),
                         {"Content-Type": "image/jpeg", "X-Category": "électroménager".encode()})
    by_json = hostile_request(torchserve, "category", "json", "électroménager")()
    assert by_header == by_json and by_header[0] == 400, (by_header, by_json)
    assert "'électroménager'" in by_header[1]["error"]


def test_ids_with_commas_are_escaped_in_text_or_listed_in_json(torchserve):
    plain = predict(torchserve, photo_bytes(), headers={"X-Top-K": "3"}).json()
    first = plain["neighbours"][0]["id"]
    escaped = f"{first}%2Cno-such-id,{first}".encode()  # two ids: "<first>,no-such-id" and <first>
    body, content_type = multipart({"image": (photo_bytes(), "image/jpeg"), "k": (b"3", None),
                                    "exclude": (escaped, None)})
    by_form = raw_post(torchserve, f"/predictions/{MODEL_NAME}", body, {"Content-Type": content_type})
    by_header = raw_post(torchserve, f"/predictions/{MODEL_NAME}", photo_bytes(),
                         {"Content-Type": "image/jpeg", "X-Top-K": b"3", "X-Exclude": escaped})
    for status, answer in (by_form, by_header):
        assert status == 200 and first not in [n["id"] for n in answer["neighbours"]], answer
    one_id = raw_post(torchserve, f"/predictions/{MODEL_NAME}", photo_bytes(),
                      {"Content-Type": "image/jpeg", "X-Top-K": b"3", "X-Exclude": f"{first}%2Cno-such-id".encode()})
    by_json = hostile_request(torchserve, "exclude", "json", [f"{first},no-such-id"])()
    for status, answer in (one_id, by_json):  # one id that holds a comma: not the first neighbour's
        assert status == 200 and first in [n["id"] for n in answer["neighbours"]], answer
