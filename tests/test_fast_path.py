"""The runtime settings of the archive: what applies on which device, and that the fast path keeps the answers.

CUDA-only settings are tested on CUDA and skipped elsewhere, never imitated on the CPU.
"""
import json
import os
import zipfile

import faiss
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
from visual_search.runtime import Runtime, RuntimeSettings, share_cores
from visual_search.service_io import Limits

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


def test_each_worker_sizes_torch_and_faiss_threads_to_its_share_of_the_cores():
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        assert share_cores(2) == max(1, cores // 2) == torch.get_num_threads() == faiss.omp_get_max_threads()
        assert share_cores(cores * 4) == 1 == torch.get_num_threads() == faiss.omp_get_max_threads()
        assert share_cores(1, threads=3) == 3 == torch.get_num_threads() == faiss.omp_get_max_threads()
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


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


def test_uploads_are_decoded_shrunk_towards_the_input_size(fast_bundle):
    """A batch holds images a little over the model's input, never full-size photos (peak memory per batch)."""
    runtime = Runtime(load_bundle(fast_bundle), "cpu")
    for body in (product_jpeg(1, (2000, 1500)), encode(product_photo("bags", 1, size=(2000, 1500)), "PNG")):
        image = runtime.decode_images(body)
        assert 32 <= min(image.size) < 64 and max(image.size) < 2 * 64, image.size
    queries, errors, batch = runtime.prepare([{"body": product_jpeg(2, (2000, 1500))}], [{}], Limits(4, 4))
    assert errors == [None] and batch.shape == (1, 3, 32, 32)


def bogus_huffman_table(jpeg):
    """A JPEG whose header PIL reads but whose Huffman table libjpeg refuses: the batch decoder fails on it."""
    data = bytearray(jpeg)
    table = data.find(b"\xff\xc4")
    data[table + 5:table + 21] = b"\xff" * 16  # the counts of codes per length
    return bytes(data)


def test_batch_jpeg_decoder_matches_pil_and_falls_back(fast_bundle, photos):
    """The batch decoder's code path, run with torchvision's CPU decoder: same tensors as the PIL path within
    JPEG decoder differences. A PNG goes through PIL; a JPEG the batch decoder refuses goes through PIL too, which
    refuses it as well, for that entry alone; a JPEG cut short (EOI put back) decodes as far as it goes."""
    runtime = Runtime(load_bundle(fast_bundle), "cpu", RuntimeSettings(gpu_decode=True))
    png = encode(product_photo("bags", 5, size=(50, 40)), "PNG")
    bogus = bogus_huffman_table(photos[3])
    images = [runtime.decode_images(b) for b in (photos[0], photos[1], png, bogus)]
    assert [isinstance(image, bytes) for image in images] == [True, True, False, True]
    assert images[2].mode == "RGB"  # the PNG was decoded by PIL
    cut_short = photos[2][: len(photos[2]) - 200] + b"\xff\xd9"
    decoded = runtime.decode_jpegs(images + [cut_short])
    assert isinstance(decoded[3], InputError) and "corrupt" in decoded[3].reason and decoded[3].status == 400
    assert isinstance(decoded[4], torch.Tensor) and decoded[4].shape == (3, *SIZE[::-1])
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
        _, _, batch = runtime.prepare(rows, [{}] * size, Limits(4, 4))
        embeddings, _ = runtime.embed(batch)
        assert np.isfinite(embeddings).all() and embeddings.shape == (size, 2048)
    assert counters["stats"]["unique_graphs"] == compiled_at_load, "a request triggered a compile"
