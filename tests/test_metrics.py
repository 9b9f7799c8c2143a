"""The handler's own metrics reach TorchServe's Prometheus endpoint: stage times, batch size, rejections by reason."""
import re

import requests

from tests.test_serving import photo_bytes, predict


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


def test_stage_times_batch_sizes_and_rejections_are_exported(torchserve):
    before = scrape(torchserve)
    assert predict(torchserve, photo_bytes()).status_code == 200
    assert predict(torchserve, photo_bytes(), headers={"X-Output": "embedding"}).status_code == 200
    assert predict(torchserve, b"not an image").status_code == 400
    assert predict(torchserve, b"").status_code == 400
    assert predict(torchserve, photo_bytes(), headers={"X-Top-K": "0"}).status_code == 400
    after = scrape(torchserve)

    for stage in ("Preprocess", "Inference", "Search"):
        name = f"VisualSearch{stage}Time"
        assert value(after, f"{name}_count") > value(before, f"{name}_count"), f"{name} missing:\n{after}"
        assert value(after, f"{name}_sum") > value(before, f"{name}_sum")
    assert value(after, "VisualSearchBatchSize_count") >= value(before, "VisualSearchBatchSize_count") + 5
    for reason in ("not_image", "empty", "bad_parameter"):
        grown = value(after, "VisualSearchRejected", Reason=reason) - value(before, "VisualSearchRejected",
                                                                          Reason=reason)
        assert grown == 1, (reason, [line for line in after.splitlines() if "Rejected" in line])
    assert 'ModelName="tiny-search"' in after
