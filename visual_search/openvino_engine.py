"""The OpenVINO engine: the bundle's IR (model.xml + model.bin) compiled for the CPU with an explicit precision hint
and the latency hint, one blocking call per batch, the embedding and the logits from the one compiled model.
openvino is imported on first use: archives of the torch engine never load it."""
import functools
import logging
from pathlib import Path

import numpy as np
import torch

from .errors import BundleError

log = logging.getLogger(__name__)
IR_XML, IR_BIN = "model.xml", "model.bin"
INPUT, EMBEDDING, LOGITS = "images", "embedding", "logits"
# The precision hint is always set: without it OpenVINO picks bf16 by itself on CPUs that have it. An int8 IR runs
# its quantized layers in int8 and the rest at f32.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
CAPABILITIES = {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}


def openvino():
    try:
        import openvino as ov  # noqa: PLC0415
    except ImportError as error:
        raise BundleError(f"the openvino engine needs the openvino package ({error}): pip install -r "
                          f"requirements-serve.txt") from None
    return ov


@functools.cache
def core():
    return openvino().Core()


@functools.cache
def cpu_supports(precision):
    """Whether this CPU runs `precision` natively (OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU device)."""
    return CAPABILITIES[precision] in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(precision, threads):
    return {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads), "ENABLE_CPU_PINNING": False}


def check_ir(model, image_size, categories, where="the IR"):
    """BundleError unless `model` takes [N, 3, S, S] images and gives [N, 2048] embeddings and [N, C] logits."""
    if len(model.inputs) != 1 or len(model.outputs) != 2:
        raise BundleError(f"{where} has {len(model.inputs)} inputs and {len(model.outputs)} outputs, expected 1 "
                          f"input ({INPUT}) and 2 outputs ({EMBEDDING}, {LOGITS})")
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.get_length() != 4 or not shape[0].is_dynamic or [d.get_length() for d in list(shape)[1:]] != [
            3, image_size, image_size]:
        raise BundleError(f"{where} takes {shape}, expected [?,3,{image_size},{image_size}]")
    for output, name, width in zip(model.outputs, (EMBEDDING, LOGITS), (2048, categories)):
        out_shape = output.get_partial_shape()
        if name not in output.get_names() or out_shape.rank.get_length() != 2 or out_shape[1].get_length() != width:
            raise BundleError(f"{where}: output {sorted(output.get_names())} {out_shape}, expected {name} [?,{width}]")


class OpenVinoModel:
    """`model(batch)` -> (embeddings, logits) as float32 tensors. `ir`: the path of model.xml, or an openvino.Model
    (training). Compiled again if the worker's thread share (torch's pool size, kept by share_cores) changes."""

    def __init__(self, ir, precision, threads=None, image_size=None, categories=None):
        self.ir, self.precision = ir, precision
        self.check = (image_size, categories)
        self.threads = None
        self.compile(int(threads or torch.get_num_threads()))

    def read(self):
        if isinstance(self.ir, (str, Path)):
            path = Path(self.ir)
            return core().read_model(str(path), str(path.with_suffix(".bin")))
        return self.ir

    def compile(self, threads):
        model = self.read()
        if self.check[0] is not None:
            check_ir(model, *self.check, where=str(self.ir) if isinstance(self.ir, (str, Path)) else "the IR")
        compiled = core().compile_model(model, "CPU", compile_config(self.precision, threads))
        hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if hint != PRECISION_HINTS[self.precision]:
            log.warning("OpenVINO compiled %s with precision %s, asked for %s", self.ir, hint, self.precision)
        self.compiled, self.request, self.threads = compiled, compiled.create_infer_request(), threads
        self.outputs = [compiled.output(EMBEDDING), compiled.output(LOGITS)]

    def __call__(self, batch):
        threads = torch.get_num_threads()
        if threads != self.threads:
            log.info("recompiling the OpenVINO model for %d threads (was %d)", threads, self.threads)
            self.compile(threads)
        self.request.infer({0: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}, share_inputs=True)
        return tuple(torch.from_numpy(self.request.get_tensor(port).data.copy()) for port in self.outputs)
