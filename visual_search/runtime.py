"""The serving fast path, set by the archive's manifest "runtime" section and applied at load time.

    precision      "fp32", "fp16" or "bf16" (half precisions apply on CUDA only; fp16 keeps the top-4 of fp32,
                   bf16 loses near-ties: see docs/gpu-fast-path.md)
    channels_last  NHWC weights and inputs
    compile        torch.compile, done at load time with warm-up batches, not on the first request
    gpu_decode     JPEG bodies decoded as one batch by torchvision.io.decode_jpeg on CUDA; other formats via PIL

The catalogue is searched on the CPU, memory-mapped and shared by every worker (visual_search.catalogue_store);
on a GPU host only the model runs on the GPU.
"""
import io
import logging
import os
import time
from dataclasses import asdict, dataclass
from functools import partial

import faiss
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .images import MAX_PIXELS, InputError, decode_image
from .index import l2_normalize
from .preprocessing import eval_transform
from .service_io import Limits, parse_query

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CUDA_ONLY = {"precision": "fp16 and bf16 are used on CUDA only; fp32 on the CPU",
             "gpu_decode": "JPEG decoding on the GPU needs CUDA; PIL decodes on the CPU"}


@dataclass(frozen=True)
class RuntimeSettings:
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    gpu_decode: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")

    @classmethod
    def from_dict(cls, values):
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown runtime settings: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self):
        return asdict(self)

    def for_device(self, device):
        """(the settings that apply on `device`, {setting: why it was dropped})."""
        if torch.device(device).type == "cuda":
            return self, {}
        default = RuntimeSettings()
        dropped = {name: why for name, why in CUDA_ONLY.items() if getattr(self, name) != getattr(default, name)}
        return RuntimeSettings(channels_last=self.channels_last, compile=self.compile), dropped


def share_cores(workers, threads=None):
    """Sizes this process's thread pools (torch's intra-op pool, FAISS's OpenMP) to its share of the cores it may
    run on: `threads`, or cores // workers. Workers that each take every core fight over them. Returns the count."""
    cores = len(os.sched_getaffinity(0))
    threads = int(threads or max(1, cores // max(1, int(workers))))
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    return threads


def is_complete_jpeg(data):
    """Starts with SOI and ends with EOI: a candidate for the batch decoder; anything else goes through PIL."""
    return len(data) > 4 and data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"


def jpeg_or_image(data, size=None):
    """Plain RGB or grey JPEG bytes are kept for the batch decoder (after a header check); else a PIL image."""
    if data is None or not is_complete_jpeg(data):
        return decode_image(data, size)
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            if header.format != "JPEG" or header.mode not in ("RGB", "L") or width * height > MAX_PIXELS:
                return decode_image(data, size)
    except (OSError, SyntaxError, ValueError):
        return decode_image(data, size)
    return bytes(data)


class Runtime:
    """Model and preprocessing with the fast-path settings applied, and the catalogue; `embed` is the hot path."""

    def __init__(self, bundle, device="cpu", settings=None, warmup_batch=0):
        self.device = torch.device(device)
        self.settings = settings or RuntimeSettings()
        self.dtype = PRECISIONS[self.settings.precision]
        self.memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        self.normalize = bundle.normalize
        self.image_size = bundle.preprocess.image_size
        self.transform = eval_transform(bundle.preprocess)
        model = bundle.model.to(self.device, self.dtype).eval().to(memory_format=self.memory_format)
        forward = model.embed_and_classify
        self.forward = torch.compile(forward) if self.settings.compile else forward
        self.catalogue = bundle.catalogue
        # each image is shrunk towards the input size as it is decoded, so a batch never holds full-size images
        self.decode_images = partial(jpeg_or_image if self.settings.gpu_decode else decode_image,
                                     size=self.image_size)
        self.warmup_seconds = self.warm_up(warmup_batch) if warmup_batch else 0.0

    def warm_up(self, batch_size):
        """Runs the largest batch and a batch of one (compiling both graphs if asked); returns seconds taken."""
        start = time.perf_counter()
        for size in dict.fromkeys((batch_size, 1)):
            self.embed(torch.zeros(size, 3, self.image_size, self.image_size, device=self.device))
        return time.perf_counter() - start

    def prepare(self, rows, headers, limits=Limits(), skip=()):
        """(queries, errors, batch) for one TorchServe batch: a Query or an InputError per row, None for the rows
        in `skip`; `batch` stacks the tensors of the valid rows that sent a photo, in their order, or is None."""
        queries, errors = [None] * len(rows), [None] * len(rows)
        for i, (row, row_headers) in enumerate(zip(rows, headers)):
            if i in skip:
                continue
            try:
                queries[i] = parse_query(row, row_headers, limits, self.decode_images)
            except InputError as error:
                errors[i] = error
        photos = [i for i, query in enumerate(queries) if query is not None and query.image is not None]
        for i, image in zip(photos, self.decode_jpegs([queries[i].image for i in photos])):
            if isinstance(image, InputError):
                queries[i], errors[i] = None, image
            else:
                queries[i].image = image
        images = [query.image for query in queries if query is not None and query.image is not None]
        return queries, errors, self.to_batch(images) if images else None

    def decode_jpegs(self, images):
        """JPEG bytes -> uint8 CHW tensors on the device, decoded as one batch; what the batch decoder refuses goes
        through PIL, and what PIL refuses comes back as its InputError. Other entries pass through."""
        positions = [i for i, image in enumerate(images) if isinstance(image, bytes)]
        out = list(images)
        for i, tensor in zip(positions, self._decode_on_device([images[i] for i in positions])):
            try:
                out[i] = tensor if tensor is not None else decode_image(images[i], self.image_size)
            except InputError as error:
                out[i] = error
        return out

    def _decode_on_device(self, blobs):
        if not blobs:
            return []
        tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        try:
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad file fails the batch call: decode one by one
            decoded = []
            for tensor in tensors:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
            return decoded

    def to_batch(self, images):
        """PIL images and/or uint8 CHW tensors -> one normalised [N, 3, S, S] tensor on the device, in order."""
        out, by_shape = [None] * len(images), {}
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                by_shape.setdefault(tuple(image.shape), []).append(i)
            else:
                out[i] = self.transform(image).to(self.device)
        for positions in by_shape.values():  # same-size images are resized as one stacked batch
            stacked = self.transform(torch.stack([images[i] for i in positions]))
            for i, tensor in zip(positions, stacked):
                out[i] = tensor
        return torch.stack(out).as_subclass(torch.Tensor)

    @torch.inference_mode()
    def embed(self, batch):
        """(embeddings float32 [N, 2048], unit length if the bundle says so; probabilities [N, C]) as numpy."""
        batch = batch.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        if self.settings.compile and batch.shape[0] > 1:
            torch._dynamo.mark_dynamic(batch, 0)  # one graph for every batch size above 1
        embeddings, logits = self.forward(batch)
        embeddings = embeddings.float().cpu().numpy()
        if self.normalize:  # the same function that normalised the catalogue at indexing
            embeddings = l2_normalize(embeddings)
        return embeddings, torch.softmax(logits.float(), dim=1).cpu().numpy()
