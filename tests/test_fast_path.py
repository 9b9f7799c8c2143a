"""The runtime settings of the archive: what applies on which device, and that the fast path keeps the answers.

CUDA-only settings are tested on CUDA and skipped elsewhere, never imitated on the CPU.
"""
import json
import zipfile

import numpy as np
import pytest
import torch

from benchmarks.inprocess import handle, load_handler, synthetic_bundle
from benchmarks.parity import agreement
from loadtests.photos import product_jpeg
from serving.build_archive import main as build_archive
from tests.fixtures import encode, product_photo
from visual_search.bundle import load_bundle
from visual_search.images import InputError, decode_image
from visual_search.runtime import Runtime, RuntimeSettings

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="fp16/bf16 and GPU JPEG decoding apply on CUDA only; no GPU here")
SIZE = (160, 120)


@pytest.fixture(scope="module")
def photos():
    return [product_jpeg(seed, SIZE) for seed in range(40)]


@pytest.fixture(scope="module")
def fast_bundle(tmp_path_factory, photos):
    return synthetic_bundle(tmp_path_factory.mktemp("fast") / "bundle", 32, photos[:16], photos[:32],
                            catalogue_size=32)


def test_cuda_only_settings_are_dropped_on_the_cpu_with_a_reason():
    settings = RuntimeSettings(precision="bf16", channels_last=True, compile=True, gpu_decode=True)
    applied, dropped = settings.for_device("cpu")
    assert applied == RuntimeSettings(precision="fp32", channels_last=True, compile=True, gpu_decode=False)
    assert set(dropped) == {"precision", "gpu_decode"} and all(dropped.values())
    assert settings.for_device("cuda:0") == (settings, {})
    with pytest.raises(ValueError):
        RuntimeSettings.from_dict({"precision": "fp8"})


def test_archive_carries_the_runtime_section_and_the_cpu_handler_runs_fp32(fast_bundle, tmp_path, photos):
    build_archive(["--bundle", str(fast_bundle), "--name", "fast", "--model-store", str(tmp_path / "store"),
                   "--precision", "bf16", "--channels-last", "--gpu-decode", "--batch-size", "4"])
    with zipfile.ZipFile(tmp_path / "store" / "fast.mar") as mar:
        runtime = json.loads(mar.read("manifest.json"))["runtime"]
    assert runtime == {"precision": "bf16", "channels_last": True, "compile": False, "gpu_decode": True}
    assert json.loads((fast_bundle / "manifest.json").read_text())["runtime"]["precision"] == "fp32"
    handler = load_handler(tmp_path / "store" / "fast.mar", tmp_path, 4, "cuda" if CUDA else "cpu")
    expected = runtime if CUDA else {**runtime, "precision": "fp32", "gpu_decode": False}
    assert handler.runtime.settings.to_dict() == expected
    answers = handle(handler, photos[:3], ["similar", "embedding", "similar"])
    assert len(answers[0]["neighbours"]) == 4 and answers[1]["dim"] == 2048


def test_channels_last_keeps_the_top4_neighbours(fast_bundle, photos):
    result = agreement(fast_bundle, photos[32:], RuntimeSettings(channels_last=True), "cpu")
    assert result["top_k_agreement"] == 1.0 and result["min_cosine"] > 0.9999


def test_batch_jpeg_decoder_matches_pil_and_falls_back(fast_bundle, photos):
    """The batch decoder's code path, run with torchvision's CPU decoder: same tensors as the PIL path within
    JPEG decoder differences; a truncated JPEG and a PNG go through PIL, which refuses or accepts them."""
    runtime = Runtime(load_bundle(fast_bundle), "cpu", RuntimeSettings(gpu_decode=True))
    png = encode(product_photo("bags", 5, size=(50, 40)), "PNG")
    images = [runtime.decode_images(b) for b in (photos[0], photos[1], png)]
    assert isinstance(images[0], bytes) and not isinstance(images[2], bytes)
    decoded = runtime.decode_jpegs(images + [photos[2][: len(photos[2]) - 200] + b"\xff\xd9"])
    assert isinstance(decoded[3], (InputError, torch.Tensor))  # refused, or decoded as far as it goes
    fast = runtime.to_batch(decoded[:3])
    slow = runtime.to_batch([decode_image(b) for b in (photos[0], photos[1], png)])
    assert fast.shape == slow.shape == (3, 3, 32, 32)
    assert torch.allclose(fast[2], slow[2])  # the PNG took the PIL path in both
    assert (fast[:2] - slow[:2]).abs().mean() < 0.05


@needs_cuda
def test_fp16_channels_last_on_cuda_keeps_99_percent_of_top4(fast_bundle, photos):
    result = agreement(fast_bundle, photos[32:], RuntimeSettings("fp16", True, False, True), "cuda")
    assert result["top_k_agreement"] >= 0.99, result


@needs_cuda
def test_gpu_decode_on_cuda_returns_device_tensors(fast_bundle, photos):
    runtime = Runtime(load_bundle(fast_bundle), "cuda", RuntimeSettings(gpu_decode=True))
    decoded = runtime.decode_jpegs([runtime.decode_images(p) for p in photos[:4]])
    assert all(t.is_cuda and t.dtype == torch.uint8 for t in decoded)


def test_compile_happens_at_load_time(fast_bundle, photos):
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    runtime = Runtime(load_bundle(fast_bundle), "cuda" if CUDA else "cpu", RuntimeSettings(compile=True),
                      warmup_batch=4)
    compiled_at_load = counters["stats"]["unique_graphs"]
    assert compiled_at_load > graphs_before, "nothing was compiled while loading"
    for size in (3, 1, 4):  # request batches of other sizes reuse the graphs compiled at load
        rows = [{"body": p} for p in photos[:size]]
        _, _, batch = runtime.prepare(rows, [{}] * size, 4, 4)
        embeddings, _ = runtime.embed(batch)
        assert np.isfinite(embeddings).all() and embeddings.shape == (size, 2048)
    assert counters["stats"]["unique_graphs"] == compiled_at_load, "a request triggered a compile"
