"""OpenVINO IRs of a trained model, made when the bundle is built so that no worker converts: the fp32 IR, converted
with two outputs (embedding, logits) and a dynamic batch, and the int8 IR, quantized by NNCF on catalogue photos
read through the archive's own preprocessing. Written into the bundle as model.xml + model.bin."""
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from training.dataset import ItemDataset
from visual_search.fileio import sha256_file, write_atomically
from visual_search.openvino_engine import EMBEDDING, INPUT, IR_BIN, IR_XML, LOGITS, openvino
from visual_search.preprocessing import eval_transform
from visual_search.runtime_settings import catalogue_settings

CALIBRATION_PHOTOS = 300


@dataclass
class Ir:
    """An IR for a bundle: an openvino.Model, or the path of a bundle's model.xml (its model.bin beside it)."""
    model: object
    precision: str  # "fp32" (serves fp32 and bf16) or "int8"
    calibration: dict = None  # what the int8 IR was calibrated on


class TwoOutputs(torch.nn.Module):
    """The model as the IR is converted from: images -> (embedding, logits), two outputs, not one tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.embed_and_classify(images)


def convert(model, image_size):
    """The fp32 IR of a ProductNet (on the CPU, in eval mode): input "images" [?, 3, S, S], outputs "embedding"
    [?, 2048] and "logits" [?, C]."""
    ov = openvino()
    model = model.cpu().float().eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # the converter traces with torch.jit.trace
        ir = ov.convert_model(TwoOutputs(model), example_input=example, input=[(-1, 3, image_size, image_size)])
    ir.inputs[0].get_tensor().set_names({INPUT})
    for output, name in zip(ir.outputs, (EMBEDDING, LOGITS)):
        output.get_tensor().set_names({name})
    return ir


def calibration_items(items, count=CALIBRATION_PHOTOS, seed=0):
    """A seeded sample of `count` catalogue items (all of them when there are fewer)."""
    items = list(items)
    return sorted(random.Random(seed).sample(items, min(count, len(items))), key=lambda it: it.id)


def calibration_tensors(root, items, preprocess, categories):
    """[1, 3, S, S] arrays of `items`, decoded and transformed exactly as the handler does its uploads."""
    dataset = ItemDataset(root, items, eval_transform(preprocess), categories, decode_size=preprocess.image_size)
    return [dataset[i][0].unsqueeze(0).numpy() for i in range(len(dataset))]


def quantize(ir, tensors):
    """The int8 IR of the fp32 `ir`, NNCF's post-training quantization calibrated on `tensors`."""
    import nncf  # noqa: PLC0415 (a training tool; workers never load it)

    start = time.perf_counter()
    quantized = nncf.quantize(ir, nncf.Dataset(tensors), subset_size=len(tensors))
    print(f"quantized to int8 on {len(tensors)} calibration photos in {time.perf_counter() - start:.0f}s", flush=True)
    return quantized


def write_ir(ir, out_dir):
    """Writes model.xml and model.bin into `out_dir` (each atomically); returns the manifest's openvino section."""
    ov, out_dir = openvino(), Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ir-") as tmp:
        if isinstance(ir.model, (str, Path)):
            source = Path(ir.model)
            shutil.copy2(source, Path(tmp) / IR_XML)
            shutil.copy2(source.with_suffix(".bin"), Path(tmp) / IR_BIN)
        else:
            ov.save_model(ir.model, str(Path(tmp) / IR_XML), compress_to_fp16=False)
        for name in (IR_XML, IR_BIN):
            with open(Path(tmp) / name, "rb") as source:
                write_atomically(out_dir / name, lambda f, source=source: shutil.copyfileobj(source, f, 8 << 20),
                                 replace=True)
    return {"precision": ir.precision, "files": {name: sha256_file(out_dir / name) for name in (IR_XML, IR_BIN)},
            "openvino_version": ov.__version__, "calibration": ir.calibration}


def catalogue_embedder(bundle):
    """(the RuntimeSettings that embedded a bundle's catalogue, the bundle's Ir or None): what must embed the rows
    added to it."""
    ir = Ir(bundle.ir, bundle.ir_precision, bundle.manifest["openvino"].get("calibration")) if bundle.ir else None
    return catalogue_settings(bundle.catalogue.manifest), ir
