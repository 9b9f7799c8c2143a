"""Train the ResNet-50 product classifier on a folder of photos sorted one folder per category.

    python -m training.train --data-dir data/photos --out-dir runs/photos

Writes train.csv / val.csv (the seeded split), TensorBoard logs, last.pt every epoch and best.pt.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from visual_search.catalogue import read_csv, scan_folder, split_items, subsample, write_csv
from visual_search.checkpoint import load_checkpoint, save_checkpoint
from visual_search.dataset import ItemDataset, make_loader
from visual_search.model import build_model, pick_device
from visual_search.preprocessing import PreprocessSettings, eval_transform, train_transform


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with one sub-folder of images per category")
    p.add_argument("--out-dir", required=True, help="run folder: split, checkpoints, TensorBoard logs")
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=42, help="seeds the split, the shuffling and the initial weights")
    p.add_argument("--max-per-category", type=int, default=None, help="train on a seeded subset")
    p.add_argument("--image-size", type=int, default=225)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (the peak one with --schedule onecycle)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=["constant", "onecycle"], default="constant")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", action="store_true", help="random horizontal flips while training")
    p.add_argument("--weights", default="none", help='"imagenet", "none", or a path to ResNet-50 weights')
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (same run folder and split)")
    p.add_argument("--keep-every-epoch", action="store_true", help="also keep epoch-NNN.pt for each epoch")
    return p.parse_args(argv)


def prepare_split(args, out_dir):
    """The seeded split, written once to the run folder and read back on resume."""
    train_csv, val_csv = out_dir / "train.csv", out_dir / "val.csv"
    if args.resume and train_csv.exists() and val_csv.exists():
        return read_csv(train_csv), read_csv(val_csv)
    items = subsample(scan_folder(args.data_dir), args.max_per_category, seed=args.seed)
    train_items, val_items = split_items(items, args.val_fraction, seed=args.seed)
    write_csv(train_items, train_csv)
    write_csv(val_items, val_csv)
    return train_items, val_items


def run_epoch(model, loader, criterion, device, optimizer=None, scheduler=None, desc=""):
    training = optimizer is not None
    model.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False)
    with torch.set_grad_enabled(training):
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images)
            loss = criterion(logits, labels)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return total_loss / max(seen, 1), correct / max(seen, 1)


def main(argv=None):
    args = get_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)

    checkpoint = load_checkpoint(args.resume) if args.resume else None
    train_items, val_items = prepare_split(args, out_dir)
    if checkpoint:
        categories = checkpoint["categories"]
        preprocess = PreprocessSettings.from_dict(checkpoint["preprocess"])
    else:
        categories = sorted({it.category for it in train_items})
        preprocess = PreprocessSettings(image_size=args.image_size)
    print(f"{len(categories)} categories, {len(train_items)} training and {len(val_items)} validation images, "
          f"{preprocess.image_size}x{preprocess.image_size} input, device {device}")

    train_loader = make_loader(ItemDataset(args.data_dir, train_items, train_transform(preprocess, args.augment),
                                           categories), args.batch_size, shuffle=True, workers=args.workers,
                               seed=args.seed, drop_last=len(train_items) > args.batch_size)
    val_loader = make_loader(ItemDataset(args.data_dir, val_items, eval_transform(preprocess), categories),
                             args.batch_size * 2, workers=args.workers)

    model = build_model(len(categories), "none" if checkpoint else args.weights).to(device)
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
        print(f"resumed from {args.resume} at epoch {start_epoch}")

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    writer = SummaryWriter(out_dir / "tensorboard")
    history = []
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        train_loss, train_acc = run_epoch(model, train_loader, criterion, device, optimizer, scheduler,
                                          desc=f"epoch {epoch + 1}/{args.epochs} train")
        val_loss, val_acc = run_epoch(model, val_loader, criterion, device, desc=f"epoch {epoch + 1} val")
        for name, value in (("loss/train", train_loss), ("loss/val", val_loss),
                            ("accuracy/train", train_acc), ("accuracy/val", val_acc)):
            writer.add_scalar(name, value, epoch + 1)
        writer.flush()
        best_acc = max(best_acc, val_acc)
        metrics = {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
                   "val_accuracy": val_acc, "best_val_accuracy": best_acc, "seconds": time.time() - started}
        history.append({"epoch": epoch + 1, **metrics})
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
              f"val loss {val_loss:.4f} acc {val_acc:.4f} | {metrics['seconds']:.0f}s")
        state = dict(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, categories=categories,
                     preprocess=preprocess, metrics=metrics, args=vars(args))
        save_checkpoint(out_dir / "last.pt.tmp", **state)
        (out_dir / "last.pt.tmp").replace(out_dir / "last.pt")
        if args.keep_every_epoch:
            save_checkpoint(out_dir / f"epoch-{epoch + 1:03d}.pt", **state)
        if val_acc >= best_acc:
            save_checkpoint(out_dir / "best.pt", **state)
    writer.close()
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    return history


if __name__ == "__main__":
    main()
