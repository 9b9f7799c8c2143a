"""The handler in this process, as TorchServe's worker runs it (the archive unpacked, its own handler file,
TorchServe's Context and metrics cache, answers serialised as the worker does), and synthetic bundles of a seeded,
calibrated ResNet-50 for tests and benchmarks that need no trained weights."""
import importlib.util
import json
import statistics
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torchvision.models.resnet import Bottleneck

from visual_search.catalogue.vectors import l2_normalize
from visual_search.images import decode_image
from visual_search.items import Item
from visual_search.model import ProductNet, TrainedModel
from visual_search.preprocessing import PreprocessSettings, eval_transform
from visual_search.runtime import Runtime
from visual_search.runtime_settings import RuntimeSettings

CATEGORIES = ("bags", "phones", "shoes")


@torch.no_grad()
def calibrated_model(preprocess, photos, seed=0):
    """A seeded random ResNet-50 with batch-norm statistics taken from `photos`, so that activations stay in range
    and embeddings of different photos differ (no trained weights are needed to measure speed or precision)."""
    torch.manual_seed(seed)
    return recalibrated(ProductNet(len(CATEGORIES)), preprocess, photos)


@torch.no_grad()
def recalibrated(model, preprocess, photos):
    """`model` with its batch-norm statistics taken afresh from `photos` (image bytes), in eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    for chunk in photo_tensors(preprocess, photos).split(16):
        model.backbone(chunk)
    return model.eval()


@torch.no_grad()
def smooth_model(preprocess, photos, seed=0):
    """calibrated_model with every residual branch starting at zero (torchvision's zero_init_residual): its features
    are smooth random projections of the photo, so that an altered copy stays near its original while different
    photos lie apart, as with trained weights. Near-duplicate tests need that; a random deep net amplifies any
    change."""
    torch.manual_seed(seed)
    model = ProductNet(len(CATEGORIES))
    for module in model.modules():
        if isinstance(module, Bottleneck):
            torch.nn.init.zeros_(module.bn3.weight)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    model.train()
    for chunk in photo_tensors(preprocess, photos).split(16):
        model.backbone(chunk)
    return model.eval()


def photo_tensors(preprocess, photos):
    transform = eval_transform(preprocess)
    return torch.stack([transform(decode_image(photo)) for photo in photos])


@torch.no_grad()
def embed_photos(model, preprocess, photos, runtime=None):
    """Unit-length embeddings of `photos` by the model's backbone, or through a visual_search Runtime."""
    chunks = photo_tensors(preprocess, photos).split(16)
    if runtime is not None:
        return np.concatenate([runtime.embed(c)[0] for c in chunks])
    return l2_normalize(torch.cat([model.backbone(c) for c in chunks]).numpy())


def synthetic_ir(model, preprocess, calibration, precision):
    """The OpenVINO IR of `model` (training.optimize): fp32, or int8 calibrated on the photos `calibration`."""
    from training.optimize import Ir, convert, quantize  # noqa: PLC0415 (as publish_bundle below)

    ir = convert(model, preprocess.image_size)
    if precision != "int8":
        return Ir(ir, "fp32")
    tensors = [t.unsqueeze(0).numpy() for t in photo_tensors(preprocess, calibration)]
    return Ir(quantize(ir, tensors), "int8", {"photos": len(tensors), "from": "synthetic photos"})


def synthetic_bundle(out_dir, image_size, calibration, catalogue_photos=(), catalogue_size=10_000, seed=0,
                     runtime="torch-fp32"):
    """A bundle whose catalogue holds the embeddings of `catalogue_photos` by `runtime` (e.g. "openvino-int8",
    its IR made from the model and, for int8, calibrated on `calibration`), then random unit vectors up to
    `catalogue_size` rows (an exact search costs the same for either)."""
    preprocess = PreprocessSettings(image_size=image_size)
    model = calibrated_model(preprocess, calibration, seed)
    settings, ir, embedder = RuntimeSettings.named(runtime), None, None
    if settings.engine == "openvino":
        ir = synthetic_ir(model, preprocess, calibration, settings.precision)
        embedder = Runtime(TrainedModel(model, preprocess, True, ir.model, ir.precision), "cpu", settings)
    vectors = [embed_photos(model, preprocess, catalogue_photos, embedder)] if len(catalogue_photos) else []
    extra = catalogue_size - len(catalogue_photos)
    if extra > 0:
        vectors.append(l2_normalize(np.random.default_rng(seed).standard_normal((extra, 2048), dtype=np.float32)))
    embeddings = np.concatenate(vectors)
    items = [Item(f"item-{i:07d}", CATEGORIES[i % 3], f"{CATEGORIES[i % 3]}/item-{i:07d}.jpg")
             for i in range(len(embeddings))]
    from training.publish import publish_bundle  # noqa: PLC0415 (benchmarks.handler_child runs this module beside
    #                                                  an archive's copy of visual_search, which holds no writer)
    publish_bundle(out_dir, model=model, categories=CATEGORIES, preprocess=preprocess, items=items,
                   embeddings=embeddings, normalize=True, profile="exact", notes="synthetic benchmark bundle",
                   progress=False, runtime=settings.to_dict(), ir=ir)
    return Path(out_dir)


def wire_bytes(value):
    """The body TorchServe's worker sends for one answer (ts/protocol/otf_message_handler.create_predict_response):
    bytes and str as they are, anything else as json.dumps(value, indent=2)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, indent=2).encode("utf-8")


def local_context(model_dir, batch_size, name="bench", device="cpu"):
    """TorchServe's own Context and metrics cache, as its worker builds them for one model directory."""
    import ts  # noqa: PLC0415
    from ts.context import Context  # noqa: PLC0415
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: PLC0415

    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    manifest = {"model": {"modelName": name, "modelVersion": "local"}}
    config = {"batchSize": batch_size, "handler": {"default_k": 4, "max_k": 100}}
    gpu = 0 if torch.device(device).type == "cuda" else None
    return Context(name, str(model_dir), manifest, batch_size, gpu, ts.__version__, metrics=metrics,
                   model_yaml_config=config)


def load_handler(archive, work_dir, batch_size, device="cpu"):
    """The archive's own handler, unpacked and initialised on the archive's files as TorchServe's worker does. Its
    `visual_search` imports resolve through sys.path (benchmarks.handler_child puts the archive's copy first)."""
    model_dir = Path(work_dir) / "model_dir"
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(model_dir)
    spec = importlib.util.spec_from_file_location("visual_search_handler", model_dir / "visual_search_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler, context = module.VisualSearchHandler(), local_context(model_dir, batch_size, device=device)
    handler.initialize(context)
    handler.context = context
    return handler


def handle_raw(handler, bodies, outputs):
    """One batch through the handler's entry point, as TorchServe's worker calls it, serialised as the worker
    does: the answers' bytes."""
    from ts.context import RequestProcessor  # noqa: PLC0415

    context = handler.context
    context.request_processor = [RequestProcessor({"X-Output": output}) for output in outputs]
    return [wire_bytes(answer) for answer in handler.handle([{"body": body} for body in bodies], context)]


def handle(handler, bodies, outputs):
    """One batch through the handler: the answers as dicts, one per body."""
    return [json.loads(answer) for answer in handle_raw(handler, bodies, outputs)]


def throughput(handler, photos, batch_size, outputs, seconds):
    """Images/s of full batches of `batch_size` over about `seconds`, after one warm-up batch."""
    pick = lambda n: ([photos[(n + i) % len(photos)] for i in range(batch_size)],  # noqa: E731
                      [outputs[(n + i) % len(outputs)] for i in range(batch_size)])
    handle_raw(handler, *pick(0))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        handle_raw(handler, *pick(done))
        done += batch_size
    return done / (time.perf_counter() - start)


def single_latency_ms(handler, photos, repeats):
    """Median ms of one request handled alone (batch of one)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        handle_raw(handler, [photos[i % len(photos)]], ["similar"])
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])
