"""Training: checkpoints hold what resuming and serving need, and training resumes from one."""
import json

import pytest
import torch

from tests.fixtures import IMAGE_SIZE
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.train import main as train


def test_checkpoint_holds_model_optimizer_epoch_categories_and_preprocessing(trained_run):
    checkpoint = load_checkpoint(trained_run / "last.pt")
    assert checkpoint["epoch"] == 1  # two epochs, counted from 0
    assert checkpoint["categories"] == ["bags", "phones", "shoes"]
    assert checkpoint["preprocess"]["image_size"] == IMAGE_SIZE
    assert checkpoint["optimizer"]["state"], "optimizer momentum buffers are saved"
    assert "val_accuracy" in checkpoint["metrics"]
    model, categories, settings = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        embeddings, logits = model.embed_and_classify(torch.zeros(2, 3, settings.image_size, settings.image_size))
    assert embeddings.shape == (2, 2048) and logits.shape == (2, 3)
    assert (trained_run / "best.pt").is_file()
    assert (trained_run / "train.csv").is_file() and (trained_run / "val.csv").is_file()
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    history = json.loads((trained_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


def test_resume_continues_from_the_saved_epoch(trained_run, photo_dir, tmp_path):
    run = tmp_path / "resumed"
    run.mkdir()
    for name in ("train.csv", "val.csv"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    history = train(["--data-dir", str(photo_dir), "--out-dir", str(run), "--resume", str(trained_run / "last.pt"),
                     "--epochs", "3", "--batch-size", "6", "--workers", "0"])
    assert [h["epoch"] for h in history] == [3]
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["epoch"] == 2
    assert resumed["preprocess"]["image_size"] == IMAGE_SIZE
    assert [it for it in (run / "train.csv").read_text().splitlines()] == \
        (trained_run / "train.csv").read_text().splitlines()


def test_missing_weights_file_is_a_clear_error(photo_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        train(["--data-dir", str(photo_dir), "--out-dir", str(tmp_path), "--weights", str(tmp_path / "nope.pth"),
               "--epochs", "1", "--image-size", "32", "--workers", "0"])


def test_local_resnet50_weights_file_initialises_the_backbone(tmp_path):
    from torchvision.models import resnet50

    from training.train import build_model

    reference = resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    model = build_model(5, str(tmp_path / "resnet50.pth"))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[2].bn3.running_var, reference.layer4[2].bn3.running_var)
    assert model.head.out_features == 5


def test_a_checkpoint_write_that_fails_half_way_leaves_the_earlier_file(tmp_path):
    """best.pt and last.pt are written through one atomic helper: a crash mid-write cannot break the earlier file."""
    from training.checkpoint import save_checkpoint
    from training.train import build_model
    from visual_search.preprocessing import PreprocessSettings

    model = build_model(3)
    state = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None, epoch=4,
                 categories=["a", "b", "c"], preprocess=PreprocessSettings(image_size=IMAGE_SIZE),
                 metrics={"val_accuracy": 0.5}, args={})
    save_checkpoint(tmp_path / "best.pt", **state)
    with pytest.raises(Exception, match="pickle"):  # torch.save fails after it has started the file
        save_checkpoint(tmp_path / "best.pt", **{**state, "epoch": 5, "args": {"not saveable": lambda: None}})
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
