"""The model at serving time, as the archive's "runtime" section sets it (visual_search.runtime_settings: the torch
engine, or the OpenVINO IR on the CPU), with its share of the CPUs and a bounded batch decoder. `prepare` turns a
batch of rows into a Prepared batch, `embed` runs the model. See docs/performance.md."""
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import psutil
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .catalogue.vectors import l2_normalize
from .errors import BundleError
from .images import InputError, decode_image
from .openvino_engine import OpenVinoModel
from .preprocessing import eval_transform
from .request import Limits, parse_query
from .runtime_settings import PRECISIONS, RuntimeSettings

log = logging.getLogger(__name__)


CPUS_ENV = "VISUAL_SEARCH_CPUS"  # the CPUs a pod requests (Kubernetes' downward API), when it has no limit
CGROUP = Path("/sys/fs/cgroup")
WORKER_SCRIPT = "model_service_worker.py"  # TorchServe's Python worker


def cgroup_cpus(root=CGROUP):
    """The CPU quota of this process's cgroup (v2 cpu.max, or v1 cfs quota / period), rounded up; None if none."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            text = (root / quota_file).read_text().split()
            quota, period = text[0], text[1] if period_file is None else (root / period_file).read_text().strip()
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    return None


def cpu_budget(environ=os.environ, root=CGROUP):
    """The CPUs this process may use: its affinity, bounded by the cgroup quota and by $VISUAL_SEARCH_CPUS."""
    bounds = [len(os.sched_getaffinity(0)), cgroup_cpus(root)]
    try:
        bounds.append(math.ceil(float(environ[CPUS_ENV])) if environ.get(CPUS_ENV) else None)
    except ValueError:
        log.warning("%s=%r is not a number of CPUs: ignored", CPUS_ENV, environ[CPUS_ENV])
    return max(1, min(b for b in bounds if b))


def count_workers():
    """Live TorchServe workers on this host: this process and its siblings that run the worker script (at least
    1, for a handler run outside TorchServe)."""
    try:
        parent = psutil.Process().parent()
        siblings = parent.children() if parent is not None else []
    except psutil.Error:
        return 1
    return max(1, sum(1 for process in siblings if runs_worker(process)))


def runs_worker(process):
    try:
        return any(arg.endswith(WORKER_SCRIPT) for arg in process.cmdline())
    except psutil.Error:  # gone, a zombie, or not ours to read
        return False


def share_cores(workers, threads=None):
    """Sizes this process's thread pools (torch's intra-op pool, FAISS's OpenMP) to `threads`, or to its share of
    the CPU budget: cpu_budget() // workers. Workers that each take every core fight over them. Returns the count."""
    threads = int(threads or max(1, cpu_budget() // max(1, int(workers))))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    return threads


class CoreShare:
    """A worker's threads, kept at its share of the CPUs as workers come and go (scale, a release's snapshot):
    the live worker count is looked at again every `every` seconds. A fixed `threads` is kept as it is."""

    def __init__(self, threads=None, every=10.0):
        self.fixed, self.every = int(threads) if threads else None, every
        self.workers, self.checked = count_workers(), time.monotonic()
        self.threads = share_cores(self.workers, self.fixed)

    def update(self):
        """Resizes the pools if the number of workers changed; returns the thread count."""
        if self.fixed or time.monotonic() - self.checked < self.every:
            return self.threads
        self.checked, workers = time.monotonic(), count_workers()
        if workers != self.workers:
            self.workers, self.threads = workers, share_cores(workers)
            log.info("%d workers on this host: %d threads each", workers, self.threads)
        return self.threads


DEVICE_DECODE_MAX_PIXELS = 12_000_000  # larger JPEGs are decoded by PIL, at 1/2, 1/4 or 1/8 scale (draft)
DEVICE_CHUNK_PIXELS = 64_000_000  # decoded pixels on the device at once (3 bytes each as uint8)


@dataclass(frozen=True)
class Jpeg:
    """JPEG bytes left for the batch decoder, with the size its header gives."""
    data: bytes
    width: int
    height: int

    @property
    def pixels(self):
        return self.width * self.height


def is_complete_jpeg(data):
    """Starts with SOI and ends with EOI: a candidate for the batch decoder; anything else goes through PIL."""
    return len(data) > 4 and data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"


def jpeg_or_image(data, size=None, max_pixels=DEVICE_DECODE_MAX_PIXELS):
    """A Jpeg for the batch decoder (plain RGB or grey, at most `max_pixels` once decoded), else a PIL image."""
    if data is None or not is_complete_jpeg(data):
        return decode_image(data, size)
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            if header.format != "JPEG" or header.mode not in ("RGB", "L") or width * height > max_pixels:
                return decode_image(data, size)
    except (OSError, SyntaxError, ValueError):
        return decode_image(data, size)
    return Jpeg(bytes(data), width, height)


def pixel_chunks(jpegs, budget=DEVICE_CHUNK_PIXELS):
    """Positions of `jpegs` in runs whose decoded pixels stay within `budget` (a larger one alone)."""
    chunk, pixels = [], 0
    for position, jpeg in enumerate(jpegs):
        if chunk and pixels + jpeg.pixels > budget:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(position)
        pixels += jpeg.pixels
    if chunk:
        yield chunk


@dataclass
class Prepared:
    """One TorchServe batch, parsed and decoded: per row a Query or an error, and the photos as one tensor."""
    queries: list  # Query or None per row
    errors: list  # InputError or None per row
    batch: torch.Tensor = None  # [n, 3, S, S], the photos of the rows in photo_rows
    photo_rows: dict = field(default_factory=dict)  # row -> its position in `batch`


def openvino_ir(source, precision):
    """The IR of `source` for an openvino runtime at `precision`: the int8 IR for int8, the fp32 one otherwise."""
    ir, ir_precision = getattr(source, "ir", None), getattr(source, "ir_precision", None)
    if ir is None:
        raise BundleError("the runtime is openvino but the bundle carries no OpenVINO IR: build it with "
                          "training.build_index --runtime openvino-...")
    if (precision == "int8") != (ir_precision == "int8"):
        raise BundleError(f"the bundle's OpenVINO IR is {ir_precision}: it serves "
                          f"{'int8 only' if ir_precision == 'int8' else 'fp32 and bf16'}, not {precision}")
    return ir


class Runtime:
    """A model and its preprocessing with the runtime settings applied; `embed` is the hot path. `source` is a Bundle
    or a TrainedModel: anything with model, preprocess, normalize and, for the openvino engine, ir (model.xml or an
    openvino.Model, the int8 one for int8) and ir_precision."""

    def __init__(self, source, device="cpu", settings=None, warmup_batch=0):
        self.device = torch.device(device)
        self.settings = settings or RuntimeSettings()
        self.normalize = source.normalize
        self.image_size = source.preprocess.image_size
        self.transform = eval_transform(source.preprocess)
        if self.settings.engine == "openvino":
            if self.device.type != "cpu":
                raise ValueError(f"the openvino engine runs on the CPU, not {self.device}")
            self.dtype, self.memory_format = torch.float32, torch.contiguous_format
            self.forward = OpenVinoModel(openvino_ir(source, self.settings.precision), self.settings.precision,
                                         image_size=self.image_size, categories=source.model.head.out_features)
        else:
            self.dtype = PRECISIONS[self.settings.precision]
            self.memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
            model = source.model.to(self.device, self.dtype).eval().to(memory_format=self.memory_format)
            forward = model.embed_and_classify
            self.forward = torch.compile(forward) if self.settings.compile else forward
        # each image is shrunk towards the input size as it is decoded, so a batch never holds full-size images
        self.decode_images = partial(jpeg_or_image if self.settings.gpu_decode else decode_image,
                                     size=self.image_size)
        self.decode_jpeg = decode_jpeg  # torchvision's batch decoder (tests stand in a failing one)
        self.chunk_pixels = DEVICE_CHUNK_PIXELS
        self.warmup_seconds = self.warm_up(warmup_batch) if warmup_batch else 0.0

    def warm_up(self, batch_size):
        """Runs the largest batch and a batch of one (compiling both graphs if asked); returns seconds taken."""
        start = time.perf_counter()
        for size in dict.fromkeys((batch_size, 1)):
            self.embed(torch.zeros(size, 3, self.image_size, self.image_size, device=self.device))
        return time.perf_counter() - start

    def prepare(self, rows, headers, limits=Limits(), skip=()):
        """A Prepared batch: a Query or an InputError per row (None for the rows in `skip`), and one tensor stacking
        the photos of the valid rows that sent one, in their order."""
        queries, errors = [None] * len(rows), [None] * len(rows)
        for i, (row, row_headers) in enumerate(zip(rows, headers)):
            if i in skip:
                continue
            try:
                queries[i] = parse_query(row, row_headers, limits, self.decode_images)
            except InputError as error:
                errors[i] = error
        photos = [i for i, query in enumerate(queries) if query is not None and query.image is not None]
        photo_rows, kept = {}, []
        for i, tensor in zip(photos, self.to_tensors([queries[i].image for i in photos])):
            if isinstance(tensor, InputError):
                queries[i], errors[i] = None, tensor
            else:
                photo_rows[i] = len(kept)
                kept.append(tensor)
        batch = torch.stack(kept).as_subclass(torch.Tensor) if kept else None
        return Prepared(queries, errors, batch, photo_rows)

    def to_tensors(self, images):
        """PIL images and Jpegs -> one normalised [3, S, S] tensor on the device each, or the InputError of an image
        that cannot be decoded. Jpegs are decoded on the device in chunks of bounded pixels; a chunk the device
        cannot hold, or a file its decoder refuses, goes through PIL."""
        out = [None] * len(images)
        for i, image in enumerate(images):
            if not isinstance(image, Jpeg):
                out[i] = self.transform(image).to(self.device)
        positions = [i for i, image in enumerate(images) if isinstance(image, Jpeg)]
        for chunk in pixel_chunks([images[i] for i in positions], self.chunk_pixels):
            members = [positions[c] for c in chunk]
            try:
                decoded = self.decode_on_device([images[i].data for i in members])
                tensors = self._transform_decoded(decoded)
            except torch.cuda.OutOfMemoryError:
                log.warning("out of device memory decoding %d JPEGs: decoding them with PIL", len(members))
                decoded = tensors = [None] * len(members)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            for i, tensor in zip(members, tensors):
                out[i] = tensor if tensor is not None else self._decode_with_pil(images[i].data)
        return out

    def _decode_with_pil(self, data):
        try:
            return self.transform(decode_image(data, self.image_size)).to(self.device)
        except InputError as error:
            return error

    def _transform_decoded(self, decoded):
        """Normalised tensors of uint8 CHW tensors (None stays None); same-size ones resized as one stack."""
        out, by_shape = [None] * len(decoded), {}
        for i, tensor in enumerate(decoded):
            if tensor is not None:
                by_shape.setdefault(tuple(tensor.shape), []).append(i)
        for positions in by_shape.values():
            stacked = self.transform(torch.stack([decoded[i] for i in positions]))
            for i, tensor in zip(positions, stacked):
                out[i] = tensor
        return out

    def decode_on_device(self, blobs):
        """uint8 CHW tensors on the device, one per JPEG (None where the decoder refuses the file), decoded as one
        batch; one bad file fails the batch call, so then one by one. A device out-of-memory error propagates."""
        tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        try:
            return self.decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            decoded = []
            for tensor in tensors:
                try:
                    decoded.append(self.decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError:
                    decoded.append(None)
            return decoded

    @torch.inference_mode()
    def embed(self, batch):
        """(embeddings float32 [N, 2048], unit length if the bundle says so; probabilities [N, C]) as numpy. A batch
        the device cannot hold is run in halves."""
        try:
            return self._embed(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            log.warning("out of device memory for a batch of %d: running it in halves", len(batch))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            halves = [self.embed(part) for part in batch.split((len(batch) + 1) // 2)]
            return tuple(np.concatenate(parts) for parts in zip(*halves))

    def _embed(self, batch):
        batch = batch.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        if self.settings.compile and batch.shape[0] > 1:
            torch._dynamo.mark_dynamic(batch, 0)  # one graph for every batch size above 1
        embeddings, logits = self.forward(batch)
        embeddings = embeddings.float().cpu().numpy()
        if self.normalize:  # the same function that normalised the catalogue at indexing
            embeddings = l2_normalize(embeddings)
        return embeddings, torch.softmax(logits.float(), dim=1).cpu().numpy()
