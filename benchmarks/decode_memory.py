"""Peak memory of the handler's decode path for one batch of large, highly compressible JPEGs (a smooth 4000x3000
JPEG is about 100 KB, and 36 MB once decoded): Runtime.prepare in a child process whose peak RSS is measured.

    python -m benchmarks.decode_memory                          # 64 JPEGs of 4000x3000 at 225x225 input
"""
import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving.torchserve import ROOT
from visual_search.cli import HelpFormatter


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", type=int, default=64, help="requests in the batch")
    p.add_argument("--photo-size", default="4000x3000", help="WxH of each JPEG (at most 40 megapixels)")
    p.add_argument("--image-size", type=int, default=225, help="the model's input side")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def status_kib(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def compressible_jpeg(width, height):
    """A smooth gradient with a few flat shapes: tiny as a JPEG, full size once decoded."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image, ImageDraw  # noqa: PLC0415

    x = np.linspace(40, 220, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0.8, 1.0, height, dtype=np.float32)[:, None, None]
    image = Image.fromarray((x * y * np.array([1.0, 0.9, 0.8], dtype=np.float32)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 4, height // 4, width // 2, height // 2], fill=(30, 60, 160))
    draw.rectangle([width // 2, height // 2, 3 * width // 4, 7 * height // 8], fill=(150, 40, 30))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def child(args):
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from training.publish import publish_bundle  # noqa: PLC0415
    from visual_search.bundle import load_bundle  # noqa: PLC0415
    from visual_search.catalogue.vectors import l2_normalize  # noqa: PLC0415
    from visual_search.items import Item  # noqa: PLC0415
    from visual_search.model import ProductNet  # noqa: PLC0415
    from visual_search.preprocessing import PreprocessSettings  # noqa: PLC0415
    from visual_search.request import Limits  # noqa: PLC0415
    from visual_search.runtime import Runtime  # noqa: PLC0415

    torch.set_num_threads(1)
    width, height = (int(v) for v in args.photo_size.lower().split("x"))
    jpeg = compressible_jpeg(width, height)
    with tempfile.TemporaryDirectory() as tmp:
        vectors = l2_normalize(np.random.default_rng(0).standard_normal((3, 2048), dtype=np.float32))
        common = {"model": ProductNet(3), "categories": ["a", "b", "c"], "normalize": True,
                  "preprocess": PreprocessSettings(image_size=args.image_size),
                  "items": [Item(f"i{n}", c, f"{c}/i{n}.jpg") for n, c in enumerate("abc")]}
        publish_bundle(tmp, embeddings=vectors, progress=False, **common)
        runtime = Runtime(load_bundle(tmp), "cpu")
    rows = [{"body": jpeg} for _ in range(args.images)]
    runtime.prepare(rows[:1], [{}], Limits(4, 100))  # warm the code paths once
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    prepared = runtime.prepare(rows, [{}] * len(rows), Limits(4, 100))
    seconds = time.perf_counter() - start
    assert not any(prepared.errors), prepared.errors
    assert tuple(prepared.batch.shape) == (args.images, 3, args.image_size, args.image_size)
    peak = status_kib("VmHWM")
    print(json.dumps({"images": args.images,
                      "photo": f"{width}x{height}", "jpeg_bytes": len(jpeg), "image_size": args.image_size,
                      "rss_before_mib": round(before / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
                      "batch_peak_mib": round((peak - before) / 1024, 1), "prepare_s": round(seconds, 2)}))


def main(argv=None):
    args = get_args(argv)
    if args.child:
        return child(args)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *(argv if argv is not None else sys.argv[1:])]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"error: the measurement failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{figures['images']} JPEGs of {figures['photo']} ({figures['jpeg_bytes'] / 1e3:.0f} KB each) at "
          f"{figures['image_size']}x{figures['image_size']}:\n"
          f"  peak RSS {figures['peak_rss_mib']:.0f} MiB, {figures['batch_peak_mib']:.0f} MiB above the "
          f"{figures['rss_before_mib']:.0f} MiB before the batch; prepare took {figures['prepare_s']:.2f} s")
    return figures


if __name__ == "__main__":
    main()
