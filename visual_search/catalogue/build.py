"""Writing catalogue folders: publish from embeddings, update in place (vectors shared by hard links, the quantizer
kept), re-index with another profile. Memory stays bounded (chunks read with pread, training on a sample). Each
folder is built under a unique staging name, fsynced and renamed into place: a half-written one is never seen."""
import os
import shutil
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from .. import EMBEDDING_DIM
from ..errors import CatalogueError
from ..fileio import staging_folder, utc_now
from ..runtime_settings import catalogue_runtime, runtime_name
from .filters import bitmap_bytes, category_bitmaps, codes_from_bitmaps, list_category_counts, set_bits
from .index import flat_codes, ivf_of, mmap_flag_for, new_index, open_index, plan_index, reserve, save_index, train_rows
from .items_db import create_items, update_items
from .manifest import (
    CATEGORIES_FILE,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    ITEMS_FILE,
    LISTS_FILE,
    MANIFEST_FILE,
    file_record,
    write_manifest,
)
from .store import open_catalogue
from .vectors import RowReader, Segment, SegmentWriter, clean_rows, segment_name

CHUNK_ROWS = 8192


def finish(folder, manifest, reused=None, progress=True):
    """Sizes, checksums and fingerprints of every file (reused for files shared with the source), the manifest,
    and read-only modes."""
    reused = reused or {}
    names = [INDEX_FILE, ITEMS_FILE, CATEGORIES_FILE, *(s["file"] for s in manifest["segments"])]
    if (folder / LISTS_FILE).exists():
        names.insert(3, LISTS_FILE)
    manifest["files"] = {name: reused.get(name) or file_record(folder / name, progress) for name in names}
    write_manifest(folder, manifest)
    for name in [*names, MANIFEST_FILE]:
        os.chmod(folder / name, 0o444)
    return manifest


def link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:  # another file system: a copy
        shutil.copy2(source, target)


def _bar(total, desc, progress):
    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True, disable=not progress)


def train(index, sample_rows, desc, progress):
    """Trains `index` (if it needs training) on float32 rows; returns seconds taken."""
    if index.is_trained:
        return 0.0
    start = time.perf_counter()
    if progress:
        print(f"{desc}: training on {len(sample_rows)} sample rows", flush=True)
    index.train(sample_rows)
    return time.perf_counter() - start


def save_index_files(index, folder, codes, n_categories):
    """index.faiss, and for IVF indexes lists.npy (items of each category per list). Returns the mmap flag."""
    save_index(index, folder / INDEX_FILE)
    ivf = ivf_of(index)
    if ivf is not None:
        np.save(folder / LISTS_FILE, list_category_counts(ivf, codes, n_categories), allow_pickle=False)
    return mmap_flag_for(index)


def sample_positions(count, rows, seed):
    return np.sort(np.random.default_rng(seed).choice(count, size=rows, replace=False))


def publish_catalogue(out_dir, embeddings, items, *, categories=None, profile=None, factory=None, search=None,
                      normalize=True, chunk_rows=CHUNK_ROWS, seed=0, progress=True, notes="", changes_folded=0,
                      runtime=None, duplicates=None):
    """Writes a new catalogue folder from embeddings (a .npy path, read in chunks, or an array) [N, 2048] and
    N items (catalogue.Item, rows in the same order). Returns the manifest.

    categories: the category names in code order (e.g. the model's); default: the items' categories, sorted.
    profile / factory / search: the index plan (visual_search.index.plan_index); default: chosen by size.
    runtime: the record of the runtime that embedded the rows (engine, precision, the query runtimes measured
    compatible; visual_search.runtime_settings); default: torch fp32.
    duplicates: the near-duplicate calibration to record (training.calibration; updates and re-indexes keep it).
    """
    reader = RowReader(embeddings)
    count = len(reader)
    if count == 0:
        raise ValueError("no embeddings: a catalogue needs at least one item")
    if categories is None:
        items = list(items)
        categories = sorted({it.category for it in items})
    categories = list(categories)
    codes_of = {name: code for code, name in enumerate(categories)}
    plan = plan_index(count, profile, factory, search)
    timings = {}
    try:
        with staging_folder(out_dir) as tmp:
            items_uid, started = uuid.uuid4().hex, time.perf_counter()
            codes = np.full(count, -1, dtype=np.int16)
            create_items(tmp / ITEMS_FILE, _item_rows(items, codes_of, codes, count), {"uid": items_uid,
                                                                                       "count": count})
            np.save(tmp / CATEGORIES_FILE, category_bitmaps(codes, len(categories), count), allow_pickle=False)
            category_counts = np.bincount(codes, minlength=len(categories)).tolist()
            timings["items"] = time.perf_counter() - started

            index = new_index(plan.factory)
            reserve(index, count)
            rows = train_rows(index, count)
            if rows:
                sample = clean_rows(reader.take(sample_positions(count, rows, seed)), 0, normalize)
                timings["train"] = train(index, sample, Path(out_dir).name, progress)
                del sample
            started = time.perf_counter()
            writer = SegmentWriter(tmp / segment_name(0), count)
            with _bar(count, f"indexing {plan.factory}", progress) as bar:
                for start in range(0, count, chunk_rows):
                    stop = min(start + chunk_rows, count)
                    chunk = clean_rows(reader.rows(start, stop), start, normalize)
                    writer.write(chunk)
                    index.add_with_ids(chunk, np.arange(start, stop, dtype=np.int64))
                    bar.update(stop - start)
            writer.close()
            timings["add"] = time.perf_counter() - started
            started = time.perf_counter()
            flag = save_index_files(index, tmp, codes, len(categories))
            del index, codes
            timings["write_index"] = time.perf_counter() - started
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "uid": uuid.uuid4().hex, "items_uid": items_uid,
                "version": 1, "parent": None, "created": utc_now(), "change": f"published {count} items",
                "notes": notes,
                "count": count, "dim": EMBEDDING_DIM, "normalized": bool(normalize), "metric": "L2",
                "categories": categories, "category_counts": category_counts, "key_space": count,
                **plan.to_dict(), "mmap_flag": flag,
                "training": {"rows": rows, "catalogue_items": count, "seed": seed,
                             "seconds": round(timings.get("train", 0), 2)},
                "changed_since_training": 0, "changes_folded": int(changes_folded),
                "segments": [Segment(segment_name(0), 0, count).to_dict()],
                "build_seconds": {k: round(v, 2) for k, v in timings.items()},
                "runtime": catalogue_runtime({"runtime": runtime}),
            }
            if duplicates is not None:
                manifest["duplicates"] = dict(duplicates)
            finish(tmp, manifest, progress=progress)
    finally:
        reader.close()
    return manifest


def _item_rows(items, codes_of, codes, count):
    n = 0
    for key, item in enumerate(items):
        if key >= count:
            raise ValueError(f"more items than the {count} embedding rows")
        code = codes_of.get(item.category)
        if code is None:
            raise ValueError(f"item {item.id!r} has category {item.category!r}, not one of {', '.join(codes_of)}")
        codes[key] = code
        n += 1
        yield key, item.id, code, item.image
    if n != count:
        raise ValueError(f"{n} items for {count} embedding rows")


def _derived(source_manifest, change, notes):
    manifest = {key: value for key, value in source_manifest.items() if key not in ("files", "build_seconds")}
    manifest.update(uid=uuid.uuid4().hex, version=int(source_manifest.get("version", 1)) + 1, created=utc_now(),
                    change=change, notes=notes,
                    parent={"uid": source_manifest["uid"], "version": source_manifest.get("version")})
    return manifest


def update_catalogue(source_dir, out_dir, *, add_items=(), add_embeddings=None, remove_ids=(),
                     chunk_rows=CHUNK_ROWS, progress=True, notes="", changes_folded=None, runtime=None):
    """The next version of a catalogue: `source_dir` minus `remove_ids` plus `add_items` with their embeddings
    (rows in the same order, embedded by `runtime`, default torch fp32, which must be the catalogue's). The quantizer
    is not retrained and old items are not re-embedded: removed ids leave the index (remove_ids), new ones are added
    with fresh keys (add_with_ids), vector segments are shared by hard links. Removed keys are never reused.
    `changes_folded`: the last change of the line's log this version holds (default: the source's). Returns the new
    manifest, which keeps the source's runtime record."""
    source = open_catalogue(source_dir, mmap=True)
    reader = None
    try:
        old = source.manifest
        if add_items:
            check_same_runtime(old, runtime, source_dir)
        remove_ids = list(dict.fromkeys(remove_ids))
        removed = source.items.keys_of(remove_ids)
        unknown = [i for i in remove_ids if i not in removed]
        if unknown:
            raise CatalogueError(f"not in the catalogue {source_dir}: {', '.join(map(repr, unknown[:10]))}"
                                 + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
        add_items = list(add_items)
        if add_items:
            if add_embeddings is None:
                raise ValueError("added items need their embeddings")
            reader = RowReader(add_embeddings)
            if len(reader) != len(add_items):
                raise ValueError(f"{len(add_items)} added items for {len(reader)} embedding rows")
        if not add_items and not remove_ids:
            raise ValueError("nothing to change: no items to add or remove")
        if old["count"] - len(removed) + len(add_items) <= 0:
            raise CatalogueError(f"no item would be left in {out_dir}: a catalogue holds at least one item")
        clashes = [i for i in source.items.keys_of([it.id for it in add_items]) if i not in removed]
        if clashes:
            raise CatalogueError(f"ids already in the catalogue: {', '.join(map(repr, clashes[:10]))} (remove them "
                                 f"in the same update to replace them)")
        categories = list(old["categories"])
        for item in add_items:
            if item.category not in categories:
                categories.append(item.category)
        codes_of = {name: code for code, name in enumerate(categories)}
        first_key, added = old["key_space"], len(add_items)
        key_space = first_key + added
        removed_keys = np.array(sorted(removed.values()), dtype=np.int64)
        change = ", ".join(part for part in (f"removed {len(removed_keys)}" if len(removed_keys) else "",
                                             f"added {added}" if added else "") if part) + " item(s)"
        manifest = _derived(old, change, notes)
        if changes_folded is not None:
            manifest["changes_folded"] = int(changes_folded)
        timings = {}
        with staging_folder(out_dir) as tmp:
            started = time.perf_counter()
            segments = list(old["segments"])
            for segment in segments:
                link_or_copy(source.folder / segment["file"], tmp / segment["file"])
            shutil.copyfile(source.folder / ITEMS_FILE, tmp / ITEMS_FILE)
            os.chmod(tmp / ITEMS_FILE, 0o644)
            items_uid = uuid.uuid4().hex
            new_codes = np.array([codes_of[it.category] for it in add_items], dtype=np.int16)
            update_items(tmp / ITEMS_FILE, removed_keys.tolist(),
                         [(first_key + i, it.id, int(code), it.image) for i, (it, code) in
                          enumerate(zip(add_items, new_codes))],
                         {"uid": items_uid, "count": old["count"] - len(removed_keys) + added})
            bitmaps = np.zeros((len(categories), bitmap_bytes(key_space)), dtype=np.uint8)
            bitmaps[:len(old["categories"]), :source.bitmaps.shape[1]] = source.bitmaps
            if len(removed_keys):
                for row in bitmaps:
                    set_bits(row, removed_keys, False)
            for code in np.unique(new_codes):
                set_bits(bitmaps[code], first_key + np.flatnonzero(new_codes == code), True)
            np.save(tmp / CATEGORIES_FILE, bitmaps, allow_pickle=False)
            counts = np.bitwise_count(bitmaps).sum(axis=1, dtype=np.int64).tolist()
            codes = codes_from_bitmaps(bitmaps, key_space)
            del bitmaps
            timings["items"] = time.perf_counter() - started

            started = time.perf_counter()
            if flat_codes(source.index) is not None:  # flat codes: refill, at its final size
                index = new_index(old["factory"])
                if not index.is_trained:  # trained codes (SQ, PQ): the source's codec, read privately, emptied
                    index = open_index(source.folder / INDEX_FILE)
                    index.reset()
                keep = np.flatnonzero(np.unpackbits(source.alive(), bitorder="little"))
                keep = keep[~np.isin(keep, removed_keys)]
                reserve(index, len(keep) + added)
                _add_stored(index, source.vectors, keep, chunk_rows, progress)
                timings["refill"] = time.perf_counter() - started
            else:
                index = open_index(source.folder / INDEX_FILE)  # a private copy in RAM; the old file stays
                timings["read_index"] = time.perf_counter() - started
                started = time.perf_counter()
                index = _remove(index, removed_keys, source, chunk_rows, progress)
                timings["remove"] = time.perf_counter() - started
            started = time.perf_counter()
            if added:
                name = segment_name(len(segments))
                writer = SegmentWriter(tmp / name, added)
                with _bar(added, "adding", progress) as bar:
                    for start in range(0, added, chunk_rows):
                        stop = min(start + chunk_rows, added)
                        chunk = clean_rows(reader.rows(start, stop), start, old["normalized"])
                        writer.write(chunk)
                        index.add_with_ids(chunk, np.arange(first_key + start, first_key + stop, dtype=np.int64))
                        bar.update(stop - start)
                writer.close()
                segments.append(Segment(name, first_key, added).to_dict())
            timings["add"] = time.perf_counter() - started
            started = time.perf_counter()
            save_index_files(index, tmp, codes, len(categories))
            count = index.ntotal
            del index, codes
            timings["write_index"] = time.perf_counter() - started
            manifest.update(items_uid=items_uid, count=count, categories=categories, category_counts=counts,
                            key_space=key_space, segments=segments,
                            changed_since_training=old.get("changed_since_training", 0) + added + len(removed_keys))
            if sum(counts) != count:
                raise CatalogueError(f"the new index holds {count} items, the category bitmaps {sum(counts)}")
            manifest["build_seconds"] = {k: round(v, 2) for k, v in timings.items()}
            reused = {s["file"]: old["files"][s["file"]] for s in old["segments"]}
            finish(tmp, manifest, reused, progress)
        return manifest
    finally:
        source.close()
        if reader is not None:
            reader.close()


def check_same_runtime(manifest, runtime, folder):
    """CatalogueError unless rows embedded by `runtime` (a record; None: torch fp32) match the catalogue's."""
    have, given = catalogue_runtime(manifest), catalogue_runtime({"runtime": runtime})
    if runtime_name(have) != runtime_name(given):
        raise CatalogueError(f"{folder} was embedded by {runtime_name(have)}; the rows to add were embedded by "
                             f"{runtime_name(given)}: embed them with the catalogue's runtime")


def _remove(index, keys, source, chunk_rows, progress):
    """`index` without `keys`: remove_ids where the index type supports it, else the same (trained) index emptied
    and refilled from the stored vectors of every other item (no training, no embedding)."""
    if not len(keys):
        return index
    try:
        removed = index.remove_ids(faiss.IDSelectorBatch(keys))
    except RuntimeError:
        removed = None
    if removed == len(keys):
        return index
    if removed is not None:
        raise CatalogueError(f"the index held {removed} of the {len(keys)} keys to remove: it does not match the "
                             f"items file")
    print(f"{type(index).__name__} cannot remove ids: refilling it from the stored vectors", flush=True)
    keep = np.flatnonzero(np.unpackbits(source.alive(), bitorder="little"))
    keep = keep[~np.isin(keep, keys)]
    index.reset()
    _add_stored(index, source.vectors, keep, chunk_rows, progress)
    return index


def _add_stored(index, vectors, keys, chunk_rows, progress):
    with _bar(len(keys), "indexing stored vectors", progress) as bar:
        for part, rows in vectors.iter_keys(keys, chunk_rows):
            index.add_with_ids(rows, part)
            bar.update(len(part))


def reindex_catalogue(source_dir, out_dir, *, profile=None, factory=None, search=None, chunk_rows=CHUNK_ROWS,
                      seed=0, progress=True, notes=""):
    """The same items with another index (a profile for a new size, a retrained quantizer): vectors, items and
    bitmaps are shared by hard links; the new index is trained on a sample of the stored vectors."""
    source = open_catalogue(source_dir, mmap=True)
    try:
        old = source.manifest
        keys = np.flatnonzero(np.unpackbits(source.alive(), bitorder="little"))
        plan = plan_index(len(keys), profile, factory, search)
        manifest = _derived(old, f"re-indexed as {plan.profile} ({plan.factory})", notes)
        timings = {}
        with staging_folder(out_dir) as tmp:
            for name in [ITEMS_FILE, CATEGORIES_FILE, *(s["file"] for s in old["segments"])]:
                link_or_copy(source.folder / name, tmp / name)
            index = new_index(plan.factory)
            reserve(index, len(keys))
            rows = train_rows(index, len(keys))
            if rows:
                chosen = keys[sample_positions(len(keys), rows, seed)]
                sample = np.concatenate([v for _, v in source.vectors.iter_keys(chosen, chunk_rows)])
                timings["train"] = train(index, sample, Path(out_dir).name, progress)
                del sample
            started = time.perf_counter()
            _add_stored(index, source.vectors, keys, chunk_rows, progress)
            timings["add"] = time.perf_counter() - started
            started = time.perf_counter()
            codes = codes_from_bitmaps(source.bitmaps, old["key_space"])
            flag = save_index_files(index, tmp, codes, len(old["categories"]))
            del index, codes
            timings["write_index"] = time.perf_counter() - started
            manifest.update(**plan.to_dict(), mmap_flag=flag, changed_since_training=0,
                            training={"rows": rows, "catalogue_items": len(keys), "seed": seed,
                                      "seconds": round(timings.get("train", 0), 2)},
                            build_seconds={k: round(v, 2) for k, v in timings.items()})
            reused = {name: old["files"][name] for name in old["files"] if name not in (INDEX_FILE, LISTS_FILE)}
            finish(tmp, manifest, reused, progress)
        return manifest
    finally:
        source.close()
