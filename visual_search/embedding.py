"""Batch embedding of catalogue images with the 2048-d extractor (eval mode, no grad)."""
import numpy as np
import torch
from tqdm import tqdm

from .dataset import ItemDataset, make_loader
from .preprocessing import eval_transform


@torch.inference_mode()
def embed_items(model, root, items, categories, preprocess, device, batch_size=64, workers=0, desc="embedding"):
    """(embeddings float32 [N, 2048], logits float32 [N, C]) for `items`, in their order."""
    model.eval().to(device)
    loader = make_loader(ItemDataset(root, items, eval_transform(preprocess), categories), batch_size, workers=workers)
    embeddings, logits = [], []
    for images, _ in tqdm(loader, desc=desc, unit="batch"):
        emb, out = model.embed_and_classify(images.to(device))
        embeddings.append(emb.float().cpu().numpy())
        logits.append(out.float().cpu().numpy())
    return np.concatenate(embeddings), np.concatenate(logits)
