"""The archive's "runtime" section: the engine (torch, or OpenVINO on the CPU) and its precision, validated; what
applies on which device; and the pairing of a query runtime with the runtime that embedded a catalogue, refused
unless they are the same or the parity gate recorded them as compatible."""
import logging
from dataclasses import asdict, dataclass

import torch

from . import openvino_engine
from .errors import BundleError

log = logging.getLogger(__name__)
ENGINES = ("torch", "openvino")
ENGINE_PRECISIONS = {"torch": ("fp32", "fp16", "bf16"), "openvino": ("fp32", "bf16", "int8")}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # torch's dtypes
TORCH_ONLY = ("channels_last", "compile", "gpu_decode")
CUDA_ONLY = {"precision": "fp16 and bf16 are used on CUDA only; fp32 on the CPU",
             "gpu_decode": "JPEG decoding on the GPU needs CUDA; PIL decodes on the CPU"}
RUNTIME_NAMES = ("torch-fp32", "openvino-fp32", "openvino-bf16", "openvino-int8")  # what embeds catalogues
LEGACY_CATALOGUE_RUNTIME = {"engine": "torch", "precision": "fp32"}  # what embedded catalogues without a record


@dataclass(frozen=True)
class RuntimeSettings:
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    gpu_decode: bool = False
    engine: str = "torch"

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        allowed = ENGINE_PRECISIONS[self.engine]
        if self.precision not in allowed:
            raise ValueError(f"precision of the {self.engine} engine must be one of {', '.join(allowed)}, not "
                             f"{self.precision!r}")
        for name in TORCH_ONLY:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")
            if self.engine != "torch" and getattr(self, name):
                raise ValueError(f"{name} is a setting of the torch engine; the {self.engine} engine takes none")

    @classmethod
    def from_dict(cls, values):
        """From a manifest's runtime section; a section without `engine` (older bundles) is the torch engine."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown runtime settings: {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def named(cls, name):
        """From "engine-precision", e.g. "openvino-int8" or "torch-fp32"."""
        engine, _, precision = name.partition("-")
        return cls(engine=engine, precision=precision or "fp32")

    def to_dict(self):
        return asdict(self)

    @property
    def name(self):
        return f"{self.engine}-{self.precision}"

    def for_device(self, device):
        """(the settings that apply on `device`, {setting: why it was dropped}). OpenVINO serves on the CPU; on
        CUDA the torch engine runs the same weights (model.pt) at fp32."""
        cuda = torch.device(device).type == "cuda"
        if self.engine == "openvino":
            if cuda:
                return RuntimeSettings(), {"engine": "OpenVINO serves on the CPU; on CUDA the torch engine runs "
                                                     "model.pt at fp32"}
            if self.precision == "bf16" and not openvino_engine.cpu_supports("bf16"):
                return RuntimeSettings(engine="openvino"), {"precision": "this CPU has no bf16 instructions: "
                                                                         "OpenVINO runs fp32"}
            return self, {}
        if cuda:
            return self, {}
        default = RuntimeSettings()
        dropped = {name: why for name, why in CUDA_ONLY.items() if getattr(self, name) != getattr(default, name)}
        return RuntimeSettings(channels_last=self.channels_last, compile=self.compile), dropped

    def record(self):
        """What a catalogue records about the runtime that embedded it."""
        return {"engine": self.engine, "precision": self.precision}

    def embeds_like(self):
        """The catalogue runtime whose vectors these settings produce: torch's half precisions are the GPU fast
        path, which keeps fp32's neighbours by its own parity check (docs/gpu-fast-path.md), so they search torch
        fp32 catalogues as they always have."""
        return LEGACY_CATALOGUE_RUNTIME if self.engine == "torch" else self.record()


def catalogue_runtime(catalogue_manifest):
    """The runtime record of a catalogue manifest: engine, precision and the query runtimes measured compatible."""
    return {**LEGACY_CATALOGUE_RUNTIME, "compatible": [], **(catalogue_manifest.get("runtime") or {})}


def catalogue_settings(catalogue_manifest):
    """The RuntimeSettings that embedded a catalogue: what must embed the rows added to it."""
    record = catalogue_runtime(catalogue_manifest)
    return RuntimeSettings(engine=record["engine"], precision=record["precision"])


def runtime_name(record):
    return f"{record['engine']}-{record['precision']}"


def check_catalogue_runtime(catalogue_manifest, settings, where="this worker"):
    """Raises BundleError unless queries embedded by `settings` may search the catalogue: the runtime that embedded
    it, or one the parity gate measured and recorded as compatible. Returns the recorded pairing (None if same)."""
    record = catalogue_runtime(catalogue_manifest)
    query = settings.embeds_like()
    if runtime_name(query) == runtime_name(record):
        return None
    for pairing in record["compatible"]:
        if runtime_name(pairing) == runtime_name(query):
            log.info("catalogue embedded by %s searched by %s queries: measured compatible (%s)",
                     runtime_name(record), runtime_name(query), pairing)
            return pairing
    measured = ", ".join(runtime_name(p) for p in record["compatible"]) or "none"
    raise BundleError(f"the catalogue {catalogue_manifest.get('uid')} was embedded by {runtime_name(record)}, but "
                      f"{where} embeds queries with {runtime_name(query)}: their vectors do not match and the "
                      f"parity gate recorded no compatibility between them (compatible query runtimes: {measured}). "
                      f"Serve the archive with the runtime that embedded its catalogue, or rebuild the catalogue "
                      f"with training.build_index --runtime {runtime_name(query)}")
