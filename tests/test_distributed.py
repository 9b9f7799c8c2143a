"""torchrun with 2 CPU processes (gloo, loopback): DDP training against one process, resume, sharded embedding."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from serving.torchserve import ROOT, free_port
from tests.fixtures import IMAGE_SIZE, write_photo_folder
from training.build_index import main as build_index
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.dataset import ItemDataset
from training.train import build_model
from training.train import main as train
from visual_search.catalogue.store import open_catalogue
from visual_search.items import read_csv, scan_folder, split_items
from visual_search.preprocessing import PreprocessSettings, train_transform

SEED, PER_RANK_BATCH, RANKS = 7, 3, 2


def torchrun(module, *args, nproc=RANKS):
    """`python -m torch.distributed.run` as a real subprocess: loopback, a free port, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", module, *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = write_photo_folder(tmp_path_factory.mktemp("ddp-photos"))
    (root / "bags" / "broken.png").write_bytes(b"this is not a PNG")  # a marketplace dump always has some
    return root


@pytest.fixture(scope="module")
def ddp_run(photos, tmp_path_factory):
    """One epoch on 2 processes with SyncBatchNorm, skipping the broken photo, reporting the first step."""
    run = tmp_path_factory.mktemp("ddp-run")
    torchrun("training.train", "--data-dir", photos, "--out-dir", run, "--image-size", IMAGE_SIZE, "--epochs", 1,
             "--batch-size", PER_RANK_BATCH, "--workers", 0, "--seed", SEED, "--sync-bn", "--skip-bad",
             "--first-step-report", run / "first-step.pt")
    return run


def first_step_gradients(model, dataset, batches):
    """(mean loss, gradients) of one step in one process, batch norm computed over each of `batches` separately."""
    model.zero_grad()
    total = 0.0
    for indices in batches:
        images = torch.stack([dataset[i][0] for i in indices])
        labels = torch.tensor([dataset[i][1] for i in indices])
        loss = torch.nn.functional.cross_entropy(model(images), labels) / len(batches)
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


def relative_error(grads, reference):
    a = torch.cat([grads[name].flatten() for name in reference])
    b = torch.cat([g.flatten() for g in reference.values()])
    return float((a - b).norm() / b.norm())


def test_first_step_matches_one_process_on_the_same_global_batch(ddp_run, photos):
    report = torch.load(ddp_run / "first-step.pt", weights_only=True)
    assert report["world_size"] == RANKS
    items = read_csv(ddp_run / "train.csv")
    categories = sorted({it.category for it in items})
    dataset = ItemDataset(photos, items, train_transform(PreprocessSettings(image_size=IMAGE_SIZE)), categories,
                          decode_size=IMAGE_SIZE)
    # Each rank's first batch: the first PER_RANK_BATCH indices of its DistributedSampler share (seeded, epoch 0).
    per_rank = [list(DistributedSampler(dataset, RANKS, rank, shuffle=True, seed=SEED))[:PER_RANK_BATCH]
                for rank in range(RANKS)]
    torch.manual_seed(SEED)  # the same initial weights as the run
    model = build_model(len(categories)).train()

    loss, grads = first_step_gradients(model, dataset, [sum(per_rank, [])])  # one process, the global batch of 6
    assert report["loss"] == pytest.approx(loss, rel=1e-4)
    # fp32 gradients of a freshly initialised ResNet-50 through batch norm over 6 values differ by about 2% between
    # two summation orders (measured: 1.6% between fp32 and fp64 in one process); wrong sampling, unsynced batch
    # norm or missing gradient averaging are off by 80-100%. The head sees no batch norm after it: tight.
    assert relative_error(report["grads"], grads) < 0.1
    assert relative_error({"head.weight": report["grads"]["head.weight"]}, {"head.weight": grads["head.weight"]}) \
        < 1e-3
    unsynced_loss, unsynced = first_step_gradients(model, dataset, per_rank)  # per-rank batch-norm statistics
    assert abs(unsynced_loss - loss) > 0.01 and relative_error(report["grads"], unsynced) > 0.5, \
        "the check cannot tell synced from unsynced batch norm"


def test_rank_zero_alone_writes_the_run_folder(ddp_run, photos):
    assert len(list((ddp_run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (ddp_run / "bad-photos.csv").read_text().splitlines() == [
        "path,reason", f"{photos / 'bags' / 'broken.png'},not an image: the body is in no format we can decode"]
    # The same seeded split as one process computes, without the broken photo.
    expected_train, expected_val = split_items(scan_folder(photos), 0.3, seed=SEED)
    assert [it.id for it in read_csv(ddp_run / "train.csv")] == [it.id for it in expected_train if it.id != "broken"]
    assert [it.id for it in read_csv(ddp_run / "val.csv")] == [it.id for it in expected_val if it.id != "broken"]
    checkpoint = load_checkpoint(ddp_run / "last.pt")
    assert not [key for key in checkpoint["model"] if key.startswith("module.")]
    model_from_checkpoint(checkpoint)  # strict load into the plain ProductNet
    assert checkpoint["epoch"] == 0 and (ddp_run / "best.pt").is_file()
    assert [h["epoch"] for h in json.loads((ddp_run / "history.json").read_text())] == [1]
    assert not list(ddp_run.glob("*.partial"))


def test_two_process_run_resumes(ddp_run, photos, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    torchrun("training.train", "--data-dir", photos, "--out-dir", run, "--resume", run / "last.pt", "--epochs", 2,
             "--batch-size", PER_RANK_BATCH, "--workers", 0, "--sync-bn")
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["epoch"] == 1
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [2]
    assert (run / "train.csv").read_text() == (ddp_run / "train.csv").read_text()
    assert (run / "bad-photos.csv").read_text() == (ddp_run / "bad-photos.csv").read_text()  # kept on resume
    before = load_checkpoint(ddp_run / "last.pt")
    assert not torch.equal(resumed["model"]["head.weight"], before["model"]["head.weight"])


def test_a_plain_run_resumes_a_two_process_checkpoint(ddp_run, photos, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    history = train(["--data-dir", str(photos), "--out-dir", str(run), "--resume", str(run / "last.pt"),
                     "--epochs", "2", "--batch-size", "6", "--workers", "0"])
    assert [h["epoch"] for h in history] == [2] and load_checkpoint(run / "last.pt")["epoch"] == 1


def test_sharded_embedding_equals_one_process(ddp_run, photos, tmp_path):
    catalogue = ddp_run / "train.csv"  # 17 items: shards of 9 and 8, in batches of 5
    args = ["--checkpoint", ddp_run / "last.pt", "--data-dir", photos, "--catalogue", catalogue, "--batch-size", 5,
            "--workers", 0, "--runtime", "torch-fp32"]
    build_index([str(a) for a in args + ["--out-dir", tmp_path / "one"]])
    torchrun("training.build_index", *args, "--out-dir", tmp_path / "two")
    one, two = tmp_path / "one", tmp_path / "two"
    items_one, items_two = (open_catalogue(folder / "catalogue") for folder in (one, two))
    assert items_two.all_items() == items_one.all_items()
    assert [it.id for it in items_two.all_items()] == [it.id for it in read_csv(catalogue)]
    a, b = np.load(one / "embeddings.npy"), np.load(two / "embeddings.npy")
    assert a.shape == b.shape == (17, 2048) and a.dtype == b.dtype == np.float32
    assert np.abs(a - b).max() <= 1e-5
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert items_one.index.ntotal == items_two.index.ntotal == 17
    assert np.array_equal(items_one.index.search(a, 3)[1], items_two.index.search(a, 3)[1])
    assert not list(two.glob("*.partial"))
