"""(a) of the benchmark in a process of its own: an archive's handler run from the unpacked archive; prints one JSON
line (images/s over the mix, the median batch-1 time, the bytes of each kind of answer)."""
import argparse
import json
import sys
import zipfile
from pathlib import Path

from serving.torchserve import ROOT
from visual_search.cli import HelpFormatter

USAGE = """examples:
  python -m benchmarks.handler_child --archive store/bench.mar --work-dir /tmp/x --batch-size 4 --seconds 20
"""



def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--archive", required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--mix", default="similar=0.8,embedding=0.2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--photo-count", type=int, default=32)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    model_dir = Path(args.work_dir) / "model_dir"
    with zipfile.ZipFile(args.archive) as mar:
        mar.extractall(model_dir)
    sys.path.insert(0, str(model_dir))  # as TorchServe's worker has it: the archive's copy of visual_search first
    sys.path.insert(1, str(ROOT))
    for name in [name for name in sys.modules if name.split(".")[0] == "visual_search"]:
        del sys.modules[name]  # the checkout's copy, loaded for the command line; the archive's is imported below
    import visual_search  # noqa: PLC0415
    from loadtests.mix import parse_mix, schedule  # noqa: PLC0415
    from loadtests.photos import load_photos  # noqa: PLC0415
    from tests.harness import handle_raw, load_handler, single_latency_ms, throughput  # noqa: PLC0415
    assert Path(visual_search.__file__).is_relative_to(model_dir), visual_search.__file__
    photos = load_photos(count=args.photo_count)
    handler = load_handler(args.archive, args.work_dir, args.batch_size, args.device)
    sizes = {output: len(handle_raw(handler, photos[:1], [output])[0]) for output in ("similar", "embedding")}
    rate = throughput(handler, photos, args.batch_size, schedule(parse_mix(args.mix)), args.seconds)
    print(json.dumps({"images_per_s": rate, "batch1_ms": single_latency_ms(handler, photos, 10),
                      "device": args.device, "answer_bytes": sizes}))


if __name__ == "__main__":
    main()
