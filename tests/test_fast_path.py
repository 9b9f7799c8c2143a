"""The runtime settings of the archive: what applies on which device, and that the fast path keeps the answers.

CUDA-only settings are tested on CUDA and skipped elsewhere, never imitated on the CPU.
"""
import io
import json
import os
import zipfile
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.parity import agreement
from loadtests.photos import product_jpeg
from serving.build_archive import main as build_archive
from tests.fixtures import encode, product_photo
from tests.harness import handle, load_handler, synthetic_bundle
from visual_search.bundle import load_bundle
from visual_search.errors import InputError
from visual_search.images import decode_image
from visual_search.request import Limits
from visual_search.runtime import Jpeg, Runtime, RuntimeSettings, cgroup_cpus, count_workers, cpu_budget, share_cores

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
    assert applied.engine == "torch"
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
    assert runtime == {"precision": "bf16", "channels_last": True, "compile": False, "gpu_decode": True,
                       "engine": "torch"}
    assert json.loads((fast_bundle / "manifest.json").read_text())["runtime"]["precision"] == "fp32"
    handler = load_handler(tmp_path / "store" / "fast.mar", tmp_path, 4, "cuda" if CUDA else "cpu")
    expected = runtime if CUDA else {**runtime, "precision": "fp32", "gpu_decode": False}
    assert handler.service.runtime.settings.to_dict() == expected
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
    prepared = runtime.prepare([{"body": product_jpeg(2, (2000, 1500))}], [{}], Limits(4, 4))
    assert prepared.errors == [None] and prepared.batch.shape == (1, 3, 32, 32)


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
    assert [isinstance(image, Jpeg) for image in images] == [True, True, False, True]
    assert images[2].mode == "RGB"  # the PNG was decoded by PIL
    cut_short = photos[2][: len(photos[2]) - 200] + b"\xff\xd9"
    decoded = runtime.decode_on_device([images[0].data, bogus, cut_short])
    assert decoded[1] is None and isinstance(decoded[2], torch.Tensor) and decoded[2].shape == (3, *SIZE[::-1])
    tensors = runtime.to_tensors(images)
    assert isinstance(tensors[3], InputError) and "corrupt" in tensors[3].reason and tensors[3].status == 400
    fast = torch.stack(tensors[:3])
    slow = torch.stack(runtime.to_tensors([decode_image(b) for b in (photos[0], photos[1], png)]))
    assert fast.shape == slow.shape == (3, 3, 32, 32)
    assert torch.allclose(fast[2], slow[2])  # the PNG took the PIL path in both
    assert (fast[:2] - slow[:2]).abs().mean() < 0.05


class RecordingDecoder:
    """torchvision's CPU decoder standing in for the GPU's: records the decoded pixels of each call, and fails
    like CUDA does (torch.cuda.OutOfMemoryError) for a call over `fail_over` pixels."""

    def __init__(self, fail_over=None):
        self.calls, self.fail_over = [], fail_over

    def __call__(self, data, mode, device):
        from torchvision.io import decode_jpeg

        tensors = data if isinstance(data, list) else [data]
        pixels = sum(int(np.prod(torchvision_size(t))) for t in tensors)
        self.calls.append(pixels)
        if self.fail_over is not None and pixels > self.fail_over:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 108.00 MiB")
        return decode_jpeg(data, mode=mode, device=device)


def torchvision_size(tensor):

    from PIL import Image as PILImage
    return PILImage.open(io.BytesIO(tensor.numpy().tobytes())).size


def test_a_large_jpeg_is_decoded_scaled_down_by_pil_never_full_size_on_the_device(fast_bundle):
    """A flat 6000x6000 JPEG (a few KB) would decode to 108 MB: it goes to PIL, which decodes it at 1/8 scale."""
    runtime = Runtime(load_bundle(fast_bundle), "cpu", RuntimeSettings(gpu_decode=True))
    runtime.decode_jpeg = RecordingDecoder()
    flat = encode(Image.new("RGB", (6000, 6000), (200, 180, 160)), "JPEG", quality=50)
    assert len(flat) < 1_000_000
    image = runtime.decode_images(flat)
    assert not isinstance(image, Jpeg) and max(image.size) <= 1500, image.size
    prepared = runtime.prepare([{"body": flat}, {"body": product_jpeg(1, SIZE)}], [{}, {}], Limits(4, 4))
    assert prepared.errors == [None, None] and prepared.batch.shape == (2, 3, 32, 32)
    assert runtime.decode_jpeg.calls == [SIZE[0] * SIZE[1]]  # only the small photo went to the device


def test_device_decoding_runs_in_chunks_of_bounded_pixels(fast_bundle):
    runtime = Runtime(load_bundle(fast_bundle), "cpu", RuntimeSettings(gpu_decode=True))
    runtime.decode_jpeg, runtime.chunk_pixels = RecordingDecoder(), 3 * 640 * 480
    bodies = [product_jpeg(seed, (640, 480)) for seed in range(8)]
    prepared = runtime.prepare([{"body": b} for b in bodies], [{}] * 8, Limits(4, 4))
    assert prepared.errors == [None] * 8 and prepared.batch.shape == (8, 3, 32, 32)
    assert runtime.decode_jpeg.calls == [3 * 640 * 480, 3 * 640 * 480, 2 * 640 * 480]


def test_a_device_out_of_memory_error_falls_back_to_pil_for_that_chunk_only(fast_bundle, photos):
    """What CUDA raises for a chunk it cannot hold does not escape: those images are decoded by PIL, the others
    on the device, a corrupt one is refused on its own, and the batch is answered."""
    runtime = Runtime(load_bundle(fast_bundle), "cpu", RuntimeSettings(gpu_decode=True))
    runtime.decode_jpeg, runtime.chunk_pixels = RecordingDecoder(fail_over=2 * 640 * 480), 3 * 640 * 480
    bodies = [product_jpeg(seed, (640, 480)) for seed in range(4)] + [bogus_huffman_table(photos[3])]
    prepared = runtime.prepare([{"body": b} for b in bodies], [{}] * 5, Limits(4, 4))
    errors, batch = prepared.errors, prepared.batch
    assert errors[:4] == [None] * 4 and isinstance(errors[4], InputError) and errors[4].status == 400
    expected = torch.stack(runtime.to_tensors([decode_image(b, 32) for b in bodies[:4]]))
    assert batch.shape == (4, 3, 32, 32) and (batch - expected).abs().mean() < 0.05
    assert runtime.decode_jpeg.calls[0] == 3 * 640 * 480  # failed: PIL decoded those three


def test_a_batch_the_device_cannot_hold_runs_in_halves(fast_bundle, photos):
    runtime = Runtime(load_bundle(fast_bundle), "cpu")
    forward, sizes = runtime.forward, []

    def limited(batch):  # fails like CUDA for a batch over 2 images
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return forward(batch)

    batch = runtime.prepare([{"body": p} for p in photos[:5]], [{}] * 5, Limits(4, 4)).batch
    expected = runtime.embed(batch)
    runtime.forward = limited
    embeddings, probabilities = runtime.embed(batch)
    assert sizes == [5, 3, 2, 1, 2] and embeddings.shape == (5, 2048)
    assert np.allclose(embeddings, expected[0], atol=1e-5) and np.allclose(probabilities, expected[1], atol=1e-5)


@needs_cuda
def test_fp16_channels_last_on_cuda_keeps_99_percent_of_top4(fast_bundle, photos):
    result = agreement(fast_bundle, photos[32:], RuntimeSettings("fp16", True, False, True), "cuda")
    assert result["top_k_agreement"] >= 0.99, result


@needs_cuda
def test_gpu_decode_on_cuda_returns_device_tensors(fast_bundle, photos):
    runtime = Runtime(load_bundle(fast_bundle), "cuda", RuntimeSettings(gpu_decode=True))
    decoded = runtime.decode_on_device([runtime.decode_images(p).data for p in photos[:4]])
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
        batch = runtime.prepare(rows, [{}] * size, Limits(4, 4)).batch
        embeddings, _ = runtime.embed(batch)
        assert np.isfinite(embeddings).all() and embeddings.shape == (size, 2048)
    assert counters["stats"]["unique_graphs"] == compiled_at_load, "a request triggered a compile"


def test_the_cpu_budget_is_bounded_by_the_cgroup_quota_and_the_pod_s_request(tmp_path):
    cores = len(os.sched_getaffinity(0))
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v2).mkdir()
    (v1 / "cpu").mkdir(parents=True)
    (v2 / "cpu.max").write_text("150000 100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(v2) == 2 and cgroup_cpus(v1) == 1 and cgroup_cpus(tmp_path / "none") is None
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(v2) is None
    assert cpu_budget({}, v1) == 1 and cpu_budget({}, v2) == cores
    assert cpu_budget({"VISUAL_SEARCH_CPUS": "1"}, v2) == 1 and cpu_budget({"VISUAL_SEARCH_CPUS": "0.5"}, v2) == 1
    assert cpu_budget({"VISUAL_SEARCH_CPUS": "lots"}, v2) == cores


def test_live_workers_are_counted_from_their_siblings(tmp_path):
    """Real processes: two children of this one that run a script named like TorchServe's worker see each other."""
    import subprocess
    import sys

    script = tmp_path / "model_service_worker.py"
    script.write_text("import sys, time\nsys.path.insert(0, sys.argv[1])\nfrom visual_search.runtime import "
                      "count_workers\ntime.sleep(float(sys.argv[2]))\nprint(count_workers(), flush=True)\n")
    root = str(Path(__file__).resolve().parent.parent)
    first = subprocess.Popen([sys.executable, str(script), root, "4"], stdout=subprocess.PIPE, text=True)
    second = subprocess.Popen([sys.executable, str(script), root, "4"], stdout=subprocess.PIPE, text=True)
    assert first.communicate(timeout=60)[0].strip() == second.communicate(timeout=60)[0].strip() == "2"
    alone = subprocess.run([sys.executable, str(script), root, "0"], capture_output=True, text=True, timeout=60)
    assert alone.stdout.strip() == "1"
    assert count_workers() == 1  # not a TorchServe worker, nor beside one
