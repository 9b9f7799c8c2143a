"""The handler's own metrics reach TorchServe's Prometheus endpoint: stage times, batch size, rejections by reason."""
from tests.test_serving import photo_bytes, predict, scrape, value


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
        # Recorded in seconds, so that they fall inside the buckets (0.005 s to 10 s) and quantiles mean something.
        grown = value(after, f"{name}_count") - value(before, f"{name}_count")
        inside = value(after, f"{name}_bucket", le="10.0") - value(before, f"{name}_bucket", le="10.0")
        assert inside == grown, f"{name}: {grown - inside} of {grown} batches over 10 (ms recorded as seconds?)"
    assert value(after, "VisualSearchBatchSize_count") >= value(before, "VisualSearchBatchSize_count") + 5
    for reason in ("not_image", "empty", "bad_parameter"):
        grown = value(after, "VisualSearchRejected", Reason=reason) - value(before, "VisualSearchRejected",
                                                                          Reason=reason)
        assert grown == 1, (reason, [line for line in after.splitlines() if "Rejected" in line])
    assert 'ModelName="tiny-search"' in after
