"""One source of truth: the archive's handler preprocesses a file exactly as training's eval transform does."""
import json
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from tests.conftest import MODEL_NAME
from tests.fixtures import encode, product_photo
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.dataset import ItemDataset
from visual_search.items import scan_folder
from visual_search.preprocessing import PreprocessSettings, eval_transform

# Runs inside the unpacked archive with only the archive on sys.path: the archive's own code and settings.
HANDLER_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from ts.context import Context, RequestProcessor
    from visual_search_handler import VisualSearchHandler
    import visual_search
    assert visual_search.__file__.startswith(sys.argv[1]), visual_search.__file__
    manifest = json.load(open("MAR-INF/MANIFEST.json"))
    context = Context(manifest["model"]["modelName"], sys.argv[1], manifest, 1, None, "0.12.0")
    handler = VisualSearchHandler()
    handler.initialize(context)
    handler.context = context
    rows = [{"body": open(path, "rb").read()} for path in sys.argv[3:]]
    context.request_processor = [RequestProcessor({}) for _ in rows]
    prepared = handler.service.runtime.prepare(rows, [{} for _ in rows], handler.service.limits)
    torch.save(prepared.batch, sys.argv[2])
""")


@pytest.fixture(scope="module")
def unpacked_archive(model_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(model_store / f"{MODEL_NAME}.mar") as archive:
        archive.extractall(out)
    return out


def test_handler_tensor_equals_training_eval_tensor(unpacked_archive, trained_run, photo_dir, tmp_path):
    """Catalogue photos, and large ones that both sides shrink while decoding, give the very same tensor."""
    _, categories, settings = model_from_checkpoint(load_checkpoint(trained_run / "last.pt"))
    large = tmp_path / "large"
    for fmt, suffix in (("JPEG", ".jpg"), ("PNG", ".png")):
        (large / "shoes").mkdir(parents=True, exist_ok=True)
        (large / "shoes" / f"big-{fmt}{suffix}").write_bytes(encode(product_photo("shoes", 5, size=(1200, 900)), fmt))
    cases = [(photo_dir, it) for it in scan_folder(photo_dir)[::5]] + [(large, it) for it in scan_folder(large)]
    training_side = torch.stack([
        ItemDataset(root, [it], eval_transform(settings), categories, decode_size=settings.image_size)[0][0]
        for root, it in cases])
    out = tmp_path / "batch.pt"
    subprocess.run([sys.executable, "-c", HANDLER_SCRIPT, str(unpacked_archive), str(out),
                    *[str(root / it.image) for root, it in cases]],
                   cwd=unpacked_archive, env={"PYTHONPATH": str(unpacked_archive), "PATH": ""}, check=True)
    serving_side = torch.load(out, weights_only=True)
    assert serving_side.shape == training_side.shape == (len(cases), 3, 32, 32)
    assert torch.equal(serving_side, training_side)


def test_archive_carries_the_checkpoint_preprocessing(unpacked_archive, trained_run):
    checkpoint = load_checkpoint(trained_run / "last.pt")
    manifest = json.loads((unpacked_archive / "manifest.json").read_text())
    assert manifest["preprocess"] == checkpoint["preprocess"]
    assert PreprocessSettings.from_dict(manifest["preprocess"]).image_size == 32


def test_settings_reject_unknown_keys_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown"):
        PreprocessSettings.from_dict({"image_size": 225, "crop": 200})
    with pytest.raises(ValueError, match="image_size"):
        PreprocessSettings(image_size=4)
    assert PreprocessSettings().image_size == 225
