"""Publish a catalogue into a new Milvus collection, in chunks with a progress bar and bounded memory: from a
catalogue folder (its stored vectors and items, nothing re-embedded; the collection keeps the folder's uid) or from
embeddings (a .npy, rows in the order of an id,category,image CSV). The index comes from the catalogue profiles
(index_plan); the identity property is written last, so a collection cut short is never served. docs/milvus.md."""
import argparse
import json
import sys
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm

from visual_search import EMBEDDING_DIM
from visual_search.bundle import catalogue_folder
from visual_search.bundle import read_manifest as read_bundle
from visual_search.catalogue import read_manifest
from visual_search.catalogue.index import PROFILES, ivf_lists, ivf_probes, recommended_profile
from visual_search.catalogue.items_db import ItemStore
from visual_search.catalogue.manifest import ITEMS_FILE
from visual_search.catalogue.milvus import (
    CATEGORY_LENGTH,
    ID_LENGTH,
    IDENTITY_PROPERTY,
    IMAGE_LENGTH,
    MilvusSettings,
    connect,
    read_identity,
)
from visual_search.catalogue.vectors import RowReader, Segment, VectorStore, clean_rows
from visual_search.cli import HelpFormatter
from visual_search.fileio import utc_now
from visual_search.items import read_csv

USAGE = """examples:
  python -m training.publish_milvus --catalogue /srv/catalogues/shop-v3 --uri http://milvus:19530 --collection s3
  python -m training.publish_milvus --bundle runs/x/bundle --uri http://127.0.0.1:19530 --collection s1 --profile exact
  python -m training.publish_milvus --embeddings runs/x/bundle/embeddings.npy --items items.csv --uri ... --collection c
  python -m training.publish_milvus ... --alias shop   # then point the alias at the new collection
"""
CHUNK_ROWS = 2000  # rows per insert: 16 MB of vectors, well under Milvus's 64 MB gRPC message


def index_plan(count, profile, hnsw=False):
    """(Milvus index parameters, our search parameters) of a catalogue profile at `count` items: exact -> FLAT,
    accurate -> IVF_SQ8 (HNSW with `hnsw`), compact -> IVF_RABITQ refined by SQ8 (a cluster's; Milvus Lite refuses
    it). Every answer of a non-FLAT index is re-ranked exactly against the stored vectors."""
    if profile == "exact":
        return {"index_type": "FLAT", "metric_type": "L2", "params": {}}, {}
    chosen = PROFILES[profile]
    if hnsw:
        return ({"index_type": "HNSW", "metric_type": "L2", "params": {"M": 16, "efConstruction": 128}},
                {"ef": 128, "k_factor": chosen.k_factor})
    nlist = ivf_lists(count)
    search = {"nprobe": ivf_probes(nlist, chosen.min_nprobe), "k_factor": chosen.k_factor}
    if profile == "compact":  # 1-bit RaBitQ codes (about 260 B per item) refined by SQ8, then re-ranked exactly
        return ({"index_type": "IVF_RABITQ", "metric_type": "L2",
                 "params": {"nlist": nlist, "refine": True, "refine_type": "SQ8"}},
                {**search, "refine_k": chosen.k_factor})
    return {"index_type": "IVF_SQ8", "metric_type": "L2", "params": {"nlist": nlist}}, search


def create_collection(client, settings):
    """The empty collection: id (primary key), category, image and the 2048-d vector."""
    from pymilvus import DataType  # noqa: PLC0415

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_LENGTH)
    schema.add_field("category", DataType.VARCHAR, max_length=CATEGORY_LENGTH)
    schema.add_field("image", DataType.VARCHAR, max_length=IMAGE_LENGTH)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=EMBEDDING_DIM)
    client.create_collection(settings.collection, schema=schema, timeout=settings.timeout)


def folder_chunks(folder, chunk_rows):
    """Yields (items, vectors) of a catalogue folder in key order, chunk_rows at a time."""
    manifest = read_manifest(folder)
    categories = manifest["categories"]
    items = ItemStore(Path(folder) / ITEMS_FILE)
    vectors = VectorStore(folder, [Segment.from_dict(s) for s in manifest["segments"]])
    try:
        chunk = []
        for key, item_id, code, image in items.iter_rows():
            chunk.append((key, item_id, categories[code], image))
            if len(chunk) == chunk_rows:
                yield chunk, vectors.get([row[0] for row in chunk])
                chunk = []
        if chunk:
            yield chunk, vectors.get([row[0] for row in chunk])
    finally:
        items.close()
        vectors.close()


def embedding_chunks(embeddings, items, chunk_rows, normalize):
    """Yields (items, vectors) of a .npy of embeddings (read in chunks) and its items, row by row."""
    reader = RowReader(embeddings)
    try:
        if len(reader) != len(items):
            raise ValueError(f"{len(reader)} embedding rows for {len(items)} items")
        for start in range(0, len(items), chunk_rows):
            stop = min(start + chunk_rows, len(items))
            rows = [(key, it.id, it.category, it.image) for key, it in enumerate(items[start:stop], start)]
            yield rows, clean_rows(reader.rows(start, stop), start, normalize)
    finally:
        reader.close()


def publish_collection(settings, chunks, *, count, categories, uid, normalized, profile=None, hnsw=False,
                       version=None, alias=None, progress=True, notes="", runtime=None):
    """Streams `chunks` ((items, vectors) pairs) into the new collection of `settings`, builds its index, loads
    it and writes its identity; returns the identity. A collection of that name is refused (written once)."""
    client = connect(settings)
    try:
        if client.has_collection(settings.collection, timeout=settings.timeout):
            raise FileExistsError(f"{settings.where()} exists: a collection is published once (use a new name, "
                                  f"and --alias to switch)")
        profile = profile or recommended_profile(count)
        index, search = index_plan(count, profile, hnsw)
        create_collection(client, settings)
        codes = {name: code for code, name in enumerate(categories)}
        category_counts, written = [0] * len(categories), 0
        with tqdm(total=count, desc=f"publishing {settings.collection}", unit="item", disable=not progress) as bar:
            for rows, vectors in chunks:
                for _, _, category, _ in rows:
                    category_counts[codes[category]] += 1
                client.insert(settings.collection, [{"id": item_id, "category": category, "image": image,
                                                     "vector": vector} for (_, item_id, category, image), vector
                                                    in zip(rows, np.asarray(vectors, dtype=np.float32).tolist())],
                              timeout=max(settings.timeout, 60))
                written += len(rows)
                bar.update(len(rows))
        if written != count:
            raise ValueError(f"{written} rows written, {count} expected")
        client.flush(settings.collection, timeout=max(settings.timeout, 600))
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=index["index_type"], metric_type="L2",
                               params=index["params"])
        client.create_index(settings.collection, index_params, timeout=max(settings.timeout, 3600))
        client.load_collection(settings.collection, timeout=max(settings.timeout, 3600))
        identity = {"uid": uid, "count": count, "dim": EMBEDDING_DIM, "normalized": bool(normalized),
                    "categories": list(categories), "category_counts": category_counts, "profile": profile,
                    "index": index, "search": search, "version": version, "published": utc_now(), "notes": notes,
                    "runtime": runtime}  # the runtime that embedded the rows (None: torch fp32)
        client.alter_collection_properties(settings.collection, properties={IDENTITY_PROPERTY: json.dumps(identity)},
                                           timeout=settings.timeout)
        if alias:
            existing = client.list_aliases(settings.collection, timeout=settings.timeout)
            try:
                client.alter_alias(settings.collection, alias, timeout=settings.timeout)
            except Exception:  # noqa: BLE001 (no such alias yet)
                if alias not in existing.get("aliases", []):
                    client.create_alias(settings.collection, alias, timeout=settings.timeout)
        return read_identity(client, settings)
    finally:
        client.close()


def publish_folder(settings, folder, *, profile=None, hnsw=False, alias=None, chunk_rows=CHUNK_ROWS, progress=True):
    """A catalogue folder into a new collection, keeping its uid, count and categories (nothing re-embedded)."""
    manifest = read_manifest(folder)
    return publish_collection(settings, folder_chunks(folder, chunk_rows), count=manifest["count"],
                              categories=manifest["categories"], uid=manifest["uid"],
                              normalized=manifest["normalized"], profile=profile or manifest.get("profile"),
                              hnsw=hnsw, version=manifest.get("version"), alias=alias, progress=progress,
                              notes=f"from catalogue folder {Path(folder).resolve()}", runtime=manifest.get("runtime"))


def publish_embeddings(settings, embeddings, items, *, categories=None, normalize=True, profile=None, hnsw=False,
                       alias=None, chunk_rows=CHUNK_ROWS, progress=True):
    """Embeddings (a .npy path or an array, rows in `items` order) into a new collection with a new uid."""
    items = list(items)
    categories = list(categories or sorted({it.category for it in items}))
    return publish_collection(settings, embedding_chunks(embeddings, items, chunk_rows, normalize), count=len(items),
                              categories=categories, uid=uuid.uuid4().hex, normalized=normalize, profile=profile,
                              hnsw=hnsw, alias=alias, progress=progress, notes="from embeddings")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=HelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--catalogue", help="a catalogue folder (visual_search.catalogue)")
    source.add_argument("--bundle", help="a bundle: its catalogue folder")
    source.add_argument("--embeddings", help="a .npy of embeddings [N, 2048], with --items")
    p.add_argument("--items", help="CSV of id,category,image, in the rows' order (with --embeddings)")
    p.add_argument("--no-normalize", action="store_true", help="with --embeddings: keep raw vectors")
    p.add_argument("--uri", required=True, help="the Milvus server, e.g. http://127.0.0.1:19530")
    p.add_argument("--collection", required=True, help="the new collection's name")
    p.add_argument("--token-file", default=None, help="a file holding the Milvus token (user:password)")
    p.add_argument("--token-env", default="MILVUS_TOKEN", help="else the env var holding it")
    p.add_argument("--profile", choices=list(PROFILES), default=None,
                   help="index profile (default: the folder's, else by size): exact FLAT, accurate IVF_SQ8, "
                        "compact IVF_RABITQ with SQ8 refinement")
    p.add_argument("--hnsw", action="store_true", help="accurate or compact as HNSW (M 16) instead of IVF")
    p.add_argument("--alias", default=None, help="create or switch this alias to the new collection")
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    settings = MilvusSettings(args.uri, args.collection, token_file=args.token_file, token_env=args.token_env,
                              timeout=60.0)
    common = {"profile": args.profile, "hnsw": args.hnsw, "alias": args.alias, "chunk_rows": args.chunk_rows}
    if args.embeddings:
        if not args.items:
            sys.exit("error: --embeddings needs --items, the CSV of its rows")
        identity = publish_embeddings(settings, args.embeddings, read_csv(args.items),
                                      normalize=not args.no_normalize, **common)
    else:
        folder = args.catalogue
        if args.bundle:
            folder = catalogue_folder(args.bundle, read_bundle(args.bundle))
        identity = publish_folder(settings, folder, **common)
    print(json.dumps({"collection": args.collection, **identity}, indent=2))
    return identity


if __name__ == "__main__":
    main()
