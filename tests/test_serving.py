"""A real TorchServe serving the tiny archive over real HTTP on loopback."""
import base64
import concurrent.futures
import json
import os
import re
import time

import pytest
import requests
from PIL import Image

from tests.conftest import MODEL_NAME
from tests.fixtures import CATEGORIES, encode, product_photo


def predict(server, body=None, headers=None, **kwargs):
    url = f"{server.urls['inference']}/predictions/{MODEL_NAME}"
    return requests.post(url, data=body, headers={**server.headers(), **(headers or {})}, timeout=60, **kwargs)


def photo_bytes(category="shoes", seed=999, fmt="JPEG", size=(640, 480), mode="RGB"):
    return encode(product_photo(category, seed, size=size, mode=mode), fmt)


def scrape(server):
    response = requests.get(f"{server.urls['metrics']}/metrics", timeout=30)
    assert response.status_code == 200
    return response.text


def value(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:_total)?(?:{{(.*)}})?\s+(\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def batches_between(before, after):
    """(batches, requests) the worker handled between two /metrics scrapes, from VisualSearchBatchSize."""
    count, total = (value(after, f"VisualSearchBatchSize_{s}") - value(before, f"VisualSearchBatchSize_{s}")
                    for s in ("count", "sum"))
    return int(count), int(total)


def concurrently(calls, stagger=0.02):
    """Runs the calls on threads, each started `stagger` s after the one before, so that they share a batch."""
    def start(i_call):
        time.sleep(i_call[0] * stagger)
        return i_call[1]()
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(start, enumerate(calls)))


def test_similar_items_answer_has_category_and_four_neighbours(torchserve, manifest):
    response = predict(torchserve, photo_bytes())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == MODEL_NAME and answer["model_version"] == "1.0"
    assert answer["category"] in CATEGORIES and 0.0 < answer["confidence"] <= 1.0
    assert answer["k"] == 4 and len(answer["neighbours"]) == 4
    distances = [n["distance"] for n in answer["neighbours"]]
    assert distances == sorted(distances)
    for neighbour in answer["neighbours"]:
        assert neighbour["category"] in CATEGORIES
        assert neighbour["image"].startswith(neighbour["category"] + "/")
        assert neighbour["id"] in neighbour["image"]


def test_k_can_be_set_per_request_four_ways(torchserve):
    image = photo_bytes()
    by_header = predict(torchserve, image, headers={"X-Top-K": "2"})
    by_form = requests.post(f"{torchserve.urls['inference']}/predictions/{MODEL_NAME}", files={"image": image},
                            data={"k": "3"}, headers=torchserve.headers(), timeout=60)
    by_json = requests.post(f"{torchserve.urls['inference']}/predictions/{MODEL_NAME}",
                            json={"image": base64.b64encode(image).decode(), "k": 5}, headers=torchserve.headers(),
                            timeout=60)
    by_query = requests.post(f"{torchserve.urls['inference']}/models/{MODEL_NAME}/invoke?k=6", data=image,
                             headers=torchserve.headers(), timeout=60)
    for response, k in ((by_header, 2), (by_form, 3), (by_json, 5), (by_query, 6)):
        assert response.status_code == 200, response.text
        assert response.json()["k"] == k and len(response.json()["neighbours"]) == k
    ids = [[n["id"] for n in r.json()["neighbours"]] for r in (by_header, by_form, by_json, by_query)]
    assert ids[0] == ids[3][:2] and ids[1] == ids[3][:3] and ids[2] == ids[3][:5]


def test_embedding_answer_has_2048_floats(torchserve):
    response = predict(torchserve, photo_bytes(), headers={"X-Output": "embedding"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["dim"] == 2048 and len(answer["embedding"]) == 2048
    norm = sum(v * v for v in answer["embedding"]) ** 0.5
    assert abs(norm - 1.0) < 1e-3 if answer["normalized"] else norm > 0


def test_unusual_but_valid_images_get_answers(torchserve):
    cases = {
        "grayscale png": photo_bytes(fmt="PNG", mode="L"),
        "palette gif": photo_bytes(fmt="GIF", mode="P"),
        "rgba png": photo_bytes(fmt="PNG", mode="RGBA"),
        "webp": photo_bytes(fmt="WEBP"),
        "bmp": photo_bytes(fmt="BMP", size=(31, 17)),
        "tiff": photo_bytes(fmt="TIFF", size=(1, 1)),
    }
    for name, body in cases.items():
        response = predict(torchserve, body)
        assert response.status_code == 200, (name, response.text)
        assert len(response.json()["neighbours"]) == 4, name


def test_bad_inputs_get_4xx_with_a_reason(torchserve):
    good = photo_bytes()
    cases = {
        "not an image": (b"hello, this is text", 400),
        "empty body": (b"", 400),
        "truncated jpeg": (good[: len(good) // 2], 400),
        "k out of range": (good, 400),
        "absurdly large": (encode(Image.new("L", (9000, 7000)), "PNG"), 413),
    }
    for name, (body, status) in cases.items():
        headers = {"X-Top-K": "0"} if name == "k out of range" else {}
        response = predict(torchserve, body, headers=headers)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.json()["error"], name
    # TorchServe itself refuses bodies over max_request_size (6.5 MB) before the handler sees them.
    assert predict(torchserve, bytes(7_000_000)).status_code == 413
    assert predict(torchserve, good).status_code == 200  # the worker is still serving


def test_one_bad_image_in_a_batch_fails_only_its_own_request(torchserve):
    bodies = [photo_bytes(seed=1), b"\x89PNG\r\n\x1a\n broken", photo_bytes(seed=2), photo_bytes(seed=3)]
    before = scrape(torchserve)
    responses = concurrently([lambda body=body: predict(torchserve, body) for body in bodies])
    assert batches_between(before, scrape(torchserve)) == (1, 4), "the 4 requests did not share one batch"
    assert [r.status_code for r in responses] == [200, 400, 200, 200], [r.text for r in responses]
    assert "image" in responses[1].json()["error"]
    assert all(len(r.json()["neighbours"]) == 4 for i, r in enumerate(responses) if i != 1)


def test_an_explanation_request_in_a_batch_gets_its_own_400_and_the_others_their_answers(torchserve):
    """TorchServe batches /explanations with /predictions and its BaseHandler takes the first row's path for all;
    here the explanation comes first, and only it is refused."""
    explain = f"{torchserve.urls['inference']}/explanations/{MODEL_NAME}"
    for _ in range(2):
        before = scrape(torchserve)
        calls = [lambda: requests.post(explain, data=photo_bytes(), headers=torchserve.headers(), timeout=60)]
        calls += [lambda seed=seed: predict(torchserve, photo_bytes(seed=seed)) for seed in (11, 12, 13)]
        responses = concurrently(calls)
        assert batches_between(before, scrape(torchserve)) == (1, 4), "the 4 requests did not share one batch"
        assert [r.status_code for r in responses] == [400, 200, 200, 200], [r.text[:200] for r in responses]
        assert "explanations are not available" in responses[0].json()["error"]
        assert all(len(r.json()["neighbours"]) == 4 for r in responses[1:])


def test_answers_are_compact_json_bytes(torchserve):
    similar = predict(torchserve, photo_bytes())
    embedding = predict(torchserve, photo_bytes(), headers={"X-Output": "embedding"})
    for response in (similar, embedding):
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
        assert response.content == json.dumps(response.json(), separators=(",", ":")).encode()
    assert len(embedding.content) < 30_000  # 2048 floats to 9 decimals; TorchServe's pretty-printed dict was 54 KB


@pytest.mark.parametrize("body, headers, status, reason", [
    ({"k": 2.9}, {}, 400, "k must be an integer, not 2.9"),
    ({"k": True}, {}, 400, "k must be an integer, not True"),
    ({"k": "3"}, {}, 400, "k must be an integer, not '3'"),
    ({}, {"X-Top-K": "2.9"}, 400, "k must be an integer, not '2.9'"),
    ({"output": "both"}, {}, 400, "output must be one of similar, embedding"),
    ({"k": 3}, {}, 200, None),
    ({"output": "embedding", "k": 0}, {}, 200, None),  # k is not read for an embedding
    ({"output": "embedding"}, {"X-Top-K": "zero"}, 200, None),
])
def test_parameters_are_checked_as_the_contract_says(torchserve, body, headers, status, reason):
    url = f"{torchserve.urls['inference']}/predictions/{MODEL_NAME}"
    response = requests.post(url, json={"image": base64.b64encode(photo_bytes()).decode(), **body},
                             headers={**torchserve.headers(), **headers}, timeout=60)
    assert response.status_code == status, response.text[:300]
    if reason:
        assert response.json() == {"error": response.json()["error"], "status": status}
        assert reason in response.json()["error"]


def test_multipart_text_fields_are_not_files(torchserve):
    url = f"{torchserve.urls['inference']}/predictions/{MODEL_NAME}"
    one = requests.post(url, files={"image": ("p.jpg", photo_bytes(), "image/jpeg")}, data={"note": "hi", "k": "2"},
                        headers=torchserve.headers(), timeout=60)
    assert one.status_code == 200 and one.json()["k"] == 2, one.text
    two = requests.post(url, files={"a": ("a.jpg", photo_bytes(), "image/jpeg"), "b": ("b.jpg", photo_bytes(),
                                                                                     "image/jpeg")},
                        headers=torchserve.headers(), timeout=60)
    assert two.status_code == 400 and "2 files in one request" in two.json()["error"]


def test_form_encoded_bodies_get_a_reason_to_send_a_content_type(torchserve):
    url = f"{torchserve.urls['inference']}/predictions/{MODEL_NAME}"
    form = {**torchserve.headers(), "Content-Type": "application/x-www-form-urlencoded"}
    # What the handler sees when the bytes happen to parse as a form: its own 415, not the bytes back.
    mangled = requests.post(url, data=b"IHDR=x&sRGB=1", headers=form, timeout=60)
    assert mangled.status_code == 415, mangled.text
    assert "form-encoded" in mangled.json()["error"] and "Content-Type: image/jpeg" in mangled.json()["error"]
    # A camera photo does not even reach the handler: TorchServe's frontend fails to parse it (README's table).
    photo = requests.post(url, data=photo_bytes(), headers=form, timeout=60)
    assert photo.status_code == 500 and photo.json()["type"] == "ErrorDataDecoderException", photo.text[:300]
    assert predict(torchserve, photo_bytes()).status_code == 200


def test_describe_shows_the_model_summary(torchserve, manifest):
    response = requests.get(f"{torchserve.urls['management']}/models/{MODEL_NAME}?customized=true",
                            headers=torchserve.headers("management"), timeout=60)
    assert response.status_code == 200, response.text
    described = json.loads(response.json()[0]["customizedMetadata"]) \
        if isinstance(response.json()[0]["customizedMetadata"], str) else response.json()[0]["customizedMetadata"]
    assert described["items"] == manifest["catalogue"]["count"] and described["categories"] == manifest["categories"]
    assert described["threads"] == len(os.sched_getaffinity(0))  # one worker (minWorkers = maxWorkers = 1)
    assert described["max_k"] == manifest["catalogue"]["count"]


def test_requests_without_the_token_are_refused(torchserve):
    url = f"{torchserve.urls['inference']}/predictions/{MODEL_NAME}"
    assert requests.post(url, data=photo_bytes(), timeout=30).status_code in (400, 401)
    assert requests.get(f"{torchserve.urls['management']}/models", timeout=30).status_code in (400, 401)
    assert requests.get(f"{torchserve.urls['management']}/models", headers=torchserve.headers("management"),
                        timeout=30).status_code == 200


def describe(server):
    response = requests.get(f"{server.urls['management']}/models/{MODEL_NAME}?customized=true",
                            headers=server.headers("management"), timeout=60)
    assert response.status_code == 200, response.text
    metadata = response.json()[0]["customizedMetadata"]
    return json.loads(metadata) if isinstance(metadata, str) else metadata


def scale(server, workers):
    response = requests.put(f"{server.urls['management']}/models/{MODEL_NAME}", headers=server.headers("management"),
                            params={"min_worker": workers, "max_worker": workers, "synchronous": "true"}, timeout=120)
    assert response.status_code == 200, response.text


def test_after_scaling_each_worker_takes_its_share_of_the_cores(torchserve):
    """Threads follow the live worker count, not the archive's: after scale to 2, each of the two workers runs
    half the cores, within the next check (every 10 s, at a batch)."""
    cores = len(os.sched_getaffinity(0))
    assert describe(torchserve)["threads"] == cores
    scale(torchserve, 2)
    try:
        seen, deadline = {}, time.time() + 90
        while time.time() < deadline and (len(seen) < 2 or any(t != max(1, cores // 2) for t in seen.values())):
            for described in concurrently([lambda: describe(torchserve)] * 6, stagger=0):  # both workers busy
                seen[described["pid"]] = described["threads"]
            time.sleep(0.5)
        assert len(seen) == 2 and set(seen.values()) == {max(1, cores // 2)}, seen
    finally:
        scale(torchserve, 1)
    assert predict(torchserve, photo_bytes()).status_code == 200
