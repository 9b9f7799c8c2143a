"""Train the ResNet-50 product classifier on photos sorted one folder per category: the seeded split, TensorBoard
logs, last.pt every epoch and best.pt. Photos are checked first (--skip-bad leaves bad ones out). Under torchrun
each process trains its share with DistributedDataParallel (docs/distributed.md)."""
import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from torchvision.models import ResNet50_Weights
from tqdm import tqdm

from training import distributed
from training.checkpoint import load_checkpoint, save_checkpoint, save_state
from training.dataset import ItemDataset, ShardSampler, make_loader
from training.photo_check import BadPhotosError, check_photos
from training.sync_batchnorm import convert_sync_batchnorm
from visual_search.cli import HelpFormatter
from visual_search.items import read_csv, scan_folder, split_items, subsample, write_csv
from visual_search.model import ProductNet
from visual_search.preprocessing import PreprocessSettings, eval_transform, train_transform

USAGE = """examples:
  python -m training.train --data-dir data/photos --out-dir runs/photos
  torchrun --nproc-per-node 4 -m training.train --data-dir data/photos --out-dir runs/photos
"""

def load_backbone_weights(model, weights):
    """`weights`: "imagenet" (torchvision's published weights, downloaded once), a local file, or "none"."""
    if weights in (None, "none"):
        return model
    if weights == "imagenet":
        try:
            state = ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=True)
        except OSError as error:  # URLError is an OSError
            raise RuntimeError(
                "could not download torchvision's ImageNet ResNet-50 weights (offline?). "
                "Download resnet50-11ad3fa6.pth elsewhere and pass its path, or use --weights none. "
                f"Cause: {error}"
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit ResNet-50: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def build_model(num_categories, weights="none"):
    return load_backbone_weights(ProductNet(num_categories), weights)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with one sub-folder of images per category")
    p.add_argument("--out-dir", required=True, help="run folder: split, checkpoints, TensorBoard logs")
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=42, help="seeds the split, the shuffling and the initial weights")
    p.add_argument("--max-per-category", type=int, default=None, help="train on a seeded subset")
    p.add_argument("--image-size", type=int, default=225)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="per process: under torchrun the global batch is "
                                                              "the number of processes times this")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (the peak one with --schedule onecycle)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=["constant", "onecycle"], default="constant")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", action="store_true", help="random horizontal flips while training")
    p.add_argument("--weights", default="none", help='"imagenet", "none", or a path to ResNet-50 weights')
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N; under torchrun auto, cpu or cuda "
                                                    "(each process takes cuda:LOCAL_RANK)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (per process under torchrun)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (same run folder and split)")
    p.add_argument("--keep-every-epoch", action="store_true", help="also keep epoch-NNN.pt for each epoch")
    p.add_argument("--skip-bad", action="store_true", help="leave out photos that cannot be decoded (listed in "
                                                           "the run folder's bad-photos.csv) instead of stopping")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: batch-norm statistics over the global "
                                                          "batch of all processes (SyncBatchNorm)")
    p.add_argument("--first-step-report", default=None, metavar="FILE",
                   help="write the first step's loss and gradients (averaged over processes) to FILE, to compare "
                        "a distributed set-up with one process")
    return p.parse_args(argv)


def item_lines(items):
    return "\n".join(f"{it.id},{it.category},{it.image}" for it in items)


def prepare_split(args, out_dir, ctx, decode_size):
    """The seeded split of the photos that decode: the same on every rank, written by rank 0, read back on resume."""
    train_csv, val_csv = out_dir / "train.csv", out_dir / "val.csv"
    resumed = bool(args.resume and train_csv.exists() and val_csv.exists())
    if resumed:
        train_items, val_items = read_csv(train_csv), read_csv(val_csv)
    else:
        items = subsample(scan_folder(args.data_dir), args.max_per_category, seed=args.seed)
        train_items, val_items = split_items(items, args.val_fraction, seed=args.seed)
    distributed.check_same_on_all_ranks(ctx, item_lines(train_items) + "\n|\n" + item_lines(val_items),
                                        "the split (train.csv/val.csv)")
    good = {it.id for it in check_photos(ctx, args.data_dir, train_items + val_items, out_dir, args.skip_bad,
                                         decode_size, args.workers, remove_stale=not resumed)}
    checked_train = [it for it in train_items if it.id in good]
    checked_val = [it for it in val_items if it.id in good]
    if not checked_train:
        raise ValueError(f"no training photos left in {args.data_dir}")
    changed = len(checked_train) + len(checked_val) < len(train_items) + len(val_items)
    if ctx.is_main and (changed or not resumed):
        write_csv(checked_train, train_csv)
        write_csv(checked_val, val_csv)
    distributed.barrier(ctx)
    return checked_train, checked_val


def write_first_step_report(ctx, path, model, loss):
    """Rank 0 saves the step's loss (mean over ranks) and every gradient (already averaged by DDP)."""
    mean_loss = distributed.sum_across_ranks(ctx, [loss.item()])[0] / ctx.world_size
    if ctx.is_main:
        module = model.module if isinstance(model, DistributedDataParallel) else model
        grads = {name: p.grad.detach().cpu().clone() for name, p in module.named_parameters()}
        save_state(path, {"loss": mean_loss, "world_size": ctx.world_size, "grads": grads})


def run_epoch(model, loader, criterion, ctx, optimizer=None, scheduler=None, desc="", report=None):
    """(loss, accuracy) over the samples of every rank; trains when `optimizer` is given."""
    training = optimizer is not None
    model.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not ctx.is_main)
    with torch.set_grad_enabled(training):
        for images, labels in bar:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            logits = model(images)
            loss = criterion(logits, labels)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if report:
                    write_first_step_report(ctx, report, model, loss)
                    report = None
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    total_loss, correct, seen = distributed.sum_across_ranks(ctx, [total_loss, correct, seen])
    return total_loss / max(seen, 1), correct / max(seen, 1)


def make_loaders(args, ctx, train_set, val_set):
    """(train loader, val loader, the train sampler under torchrun or None)."""
    if not ctx.distributed:
        train_loader = make_loader(train_set, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed,
                                   drop_last=len(train_set) > args.batch_size)
        return train_loader, make_loader(val_set, args.batch_size * 2, workers=args.workers), None
    # Every rank gets the same number of samples (padded by repeating a few), so the same number of steps.
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=args.seed)
    train_loader = make_loader(train_set, args.batch_size, workers=args.workers, seed=args.seed + ctx.rank,
                               drop_last=sampler.num_samples > args.batch_size, sampler=sampler)
    val_loader = make_loader(val_set, args.batch_size * 2, workers=args.workers,
                             sampler=ShardSampler(len(val_set), ctx.rank, ctx.world_size))
    return train_loader, val_loader, sampler


def make_model(args, ctx, num_categories, pretrained):
    """The model on this rank's device; local rank 0 builds first, so ImageNet weights download once per node."""
    if ctx.local_rank != 0:
        distributed.barrier(ctx)
    model = build_model(num_categories, pretrained).to(ctx.device)
    if ctx.local_rank == 0:
        distributed.barrier(ctx)
    if args.sync_bn and ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device)
    return model


def train(args, ctx):
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = ctx.device

    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint:
        preprocess = PreprocessSettings.from_dict(checkpoint["preprocess"])
    else:
        preprocess = PreprocessSettings(image_size=args.image_size)
    train_items, val_items = prepare_split(args, out_dir, ctx, preprocess.image_size)
    categories = checkpoint["categories"] if checkpoint else sorted({it.category for it in train_items})
    if ctx.is_main:
        print(f"{len(categories)} categories, {len(train_items)} training and {len(val_items)} validation images, "
              f"{preprocess.image_size}x{preprocess.image_size} input, device {device}")
        if ctx.distributed:
            print(f"{ctx.world_size} processes ({ctx.backend}), global batch {args.batch_size * ctx.world_size}"
                  f"{', SyncBatchNorm' if args.sync_bn else ''}")

    train_set = ItemDataset(args.data_dir, train_items, train_transform(preprocess, args.augment), categories,
                            decode_size=preprocess.image_size)
    val_set = ItemDataset(args.data_dir, val_items, eval_transform(preprocess), categories,
                          decode_size=preprocess.image_size)
    train_loader, val_loader, sampler = make_loaders(args, ctx, train_set, val_set)

    model = make_model(args, ctx, len(categories), "none" if checkpoint else args.weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = None
    if args.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                        steps_per_epoch=len(train_loader))
    start_epoch, best_acc = 0, -math.inf
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint["scheduler"] is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch = checkpoint["epoch"] + 1
        best_acc = checkpoint["metrics"].get("best_val_accuracy", -math.inf)
        if ctx.is_main:
            print(f"resumed from {args.resume} at epoch {start_epoch}")
    net = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(args.seed + ctx.rank)  # different augmentation per rank; the weights are already equal

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    writer = SummaryWriter(out_dir / "tensorboard") if ctx.is_main else None
    history, report = [], args.first_step_report
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_loss, train_acc = run_epoch(net, train_loader, criterion, ctx, optimizer, scheduler,
                                          desc=f"epoch {epoch + 1}/{args.epochs} train", report=report)
        report = None
        distributed.broadcast_buffers(ctx, model)  # validate (and save) rank 0's batch-norm statistics everywhere
        val_loss, val_acc = run_epoch(model, val_loader, criterion, ctx, desc=f"epoch {epoch + 1} val")
        best_acc = max(best_acc, val_acc)
        metrics = {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
                   "val_accuracy": val_acc, "best_val_accuracy": best_acc, "seconds": time.time() - started}
        history.append({"epoch": epoch + 1, **metrics})
        if not ctx.is_main:
            continue
        for name, value in (("loss/train", train_loss), ("loss/val", val_loss),
                            ("accuracy/train", train_acc), ("accuracy/val", val_acc)):
            writer.add_scalar(name, value, epoch + 1)
        writer.flush()
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
              f"val loss {val_loss:.4f} acc {val_acc:.4f} | {metrics['seconds']:.0f}s")
        state = dict(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, categories=categories,
                     preprocess=preprocess, metrics=metrics, args=vars(args))
        save_checkpoint(out_dir / "last.pt", **state)
        if args.keep_every_epoch:
            save_checkpoint(out_dir / f"epoch-{epoch + 1:03d}.pt", **state)
        if val_acc >= best_acc:
            save_checkpoint(out_dir / "best.pt", **state)
    if ctx.is_main:
        writer.close()
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    return history


def main(argv=None):
    args = get_args(argv)
    with distributed.session(args.device) as ctx:
        return train(args, ctx)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        distributed.exit_with_error(error, same_on_every_rank=isinstance(error, BadPhotosError))
