"""A real TorchServe serving the tiny archive over real HTTP on loopback."""
import base64
import concurrent.futures

import requests
from PIL import Image

from tests.conftest import MODEL_NAME
from tests.fixtures import CATEGORIES, encode, product_photo


def predict(server, body=None, headers=None, **kwargs):
    url = f"{server.urls['inference']}/predictions/{MODEL_NAME}"
    return requests.post(url, data=body, headers={**server.headers(), **(headers or {})}, timeout=60, **kwargs)


def photo_bytes(category="shoes", seed=999, fmt="JPEG", size=(640, 480), mode="RGB"):
    return encode(product_photo(category, seed, size=size, mode=mode), fmt)


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
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: predict(torchserve, body), bodies))
    assert [r.status_code for r in responses] == [200, 400, 200, 200], [r.text for r in responses]
    assert "image" in responses[1].json()["error"]
    assert all(len(r.json()["neighbours"]) == 4 for i, r in enumerate(responses) if i != 1)


def test_requests_without_the_token_are_refused(torchserve):
    url = f"{torchserve.urls['inference']}/predictions/{MODEL_NAME}"
    assert requests.post(url, data=photo_bytes(), timeout=30).status_code in (400, 401)
    assert requests.get(f"{torchserve.urls['management']}/models", timeout=30).status_code in (400, 401)
    assert requests.get(f"{torchserve.urls['management']}/models", headers=torchserve.headers("management"),
                        timeout=30).status_code == 200
