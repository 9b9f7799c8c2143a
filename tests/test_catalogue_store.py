"""Catalogue folders: publish from embeddings on disk, open memory-mapped, exactly-k search, filters, search by
listing, updates in place, and refusal of swapped or truncated files. Real FAISS indexes and SQLite files."""
import os
import shutil
import stat

import faiss
import numpy as np
import pytest

from visual_search.catalogue import SearchRequest, open_catalogue, verify_catalogue
from visual_search.catalogue.build import publish_catalogue, reindex_catalogue, update_catalogue
from visual_search.catalogue.manifest import INDEX_FILE, ITEMS_FILE
from visual_search.catalogue.search import EXACT_SCAN_UP_TO
from visual_search.catalogue.vectors import l2_normalize
from visual_search.errors import CatalogueError, FilterError, InputError, UnknownListingError
from visual_search.items import Item

DIM, N = 2048, 12_000
CATEGORIES = ["bag", "coat", "dress", "shoe", "rare", "empty"]  # "rare" is small, "empty" holds nothing


def synthetic(n, seed):
    """Unit vectors in 48 clusters of a 96-d subspace of R^2048, plus a little isotropic noise: nearest neighbours
    are found in a few IVF lists, as with real embeddings, but not all in one."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(DIM, 96)))[0].T.astype(np.float32)
    centres = np.random.default_rng(98).normal(size=(48, 96)).astype(np.float32)
    cluster = rng.integers(0, 48, n)
    points = centres[cluster] + 0.8 * rng.normal(size=(n, 96)).astype(np.float32)
    vectors = points @ basis + 0.05 * rng.normal(size=(n, DIM)).astype(np.float32)
    return l2_normalize(vectors), cluster


def category_of(i, cluster):
    return "rare" if i % 100 == 7 else CATEGORIES[cluster % 4]


def make_items(n, clusters, prefix="sku"):
    return [Item(f"{prefix}-{i:05d}", category_of(i, c), f"{category_of(i, c)}/{prefix}-{i:05d}.png")
            for i, c in enumerate(clusters)]


def exact_top(queries, vectors, k, allowed=None):
    """Brute-force top-k rows (by squared L2) among `allowed` rows (default all)."""
    rows = np.arange(len(vectors)) if allowed is None else np.asarray(allowed)
    d = ((queries ** 2).sum(1)[:, None] + (vectors[rows] ** 2).sum(1)[None] - 2 * queries @ vectors[rows].T)
    return rows[np.argsort(d, axis=1, kind="stable")[:, :k]]


def recall(found_ids, true_rows, ids):
    hits = [len(set(f) & {ids[r] for r in t}) / len(t) for f, t in zip(found_ids, true_rows)]
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogues")
    vectors, clusters = synthetic(N, seed=0)
    raw = vectors * np.random.default_rng(1).uniform(0.5, 3.0, size=(N, 1)).astype(np.float32)  # not unit length
    np.save(root / "embeddings.npy", raw)
    items = make_items(N, clusters)
    faiss.omp_set_num_threads(1)
    manifest = publish_catalogue(root / "v1", root / "embeddings.npy", items, categories=CATEGORIES,
                                 profile="accurate", progress=False)
    queries, _ = synthetic(200, seed=7)
    return {"root": root, "vectors": vectors, "items": items, "ids": [it.id for it in items], "queries": queries,
            "manifest": manifest}


@pytest.fixture(scope="module")
def catalogue(data):
    opened = open_catalogue(data["root"] / "v1")
    yield opened
    opened.close()


def ids_of(hits):
    return [[n.id for n in h.neighbours] for h in hits]


def test_publish_writes_an_ivf_profile_with_its_search_parameters(data, catalogue):
    manifest = data["manifest"]
    assert manifest["profile"] == "accurate" and manifest["factory"].startswith("IVF")
    assert manifest["search"]["nprobe"] >= 8 and manifest["search"]["k_factor"] >= 1
    assert manifest["count"] == N and manifest["key_space"] == N and manifest["normalized"] is True
    assert manifest["category_counts"][CATEGORIES.index("empty")] == 0 and sum(manifest["category_counts"]) == N
    assert manifest["training"]["rows"] <= N
    assert faiss.extract_index_ivf(catalogue.index).nprobe == manifest["search"]["nprobe"]  # applied at open
    stored = catalogue.vectors.get([0, 5, N - 1])
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)  # normalised while publishing
    assert np.allclose(stored, data["vectors"][[0, 5, N - 1]], atol=1e-5)
    for name in manifest["files"]:
        assert not os.stat(data["root"] / "v1" / name).st_mode & stat.S_IWUSR  # read-only


def test_exactly_k_and_recall_against_exact_search(data, catalogue):
    queries, vectors, ids = data["queries"], data["vectors"], data["ids"]
    for k in (1, 10, 300):
        hits = catalogue.search(queries, k)
        assert all(len(h.neighbours) == k and h.complete and h.available == N for h in hits)
    hits = catalogue.search(queries, 10)
    assert recall(ids_of(hits), exact_top(queries, vectors, 10), ids) >= 0.9
    for h, q in zip(hits[:20], queries[:20]):  # exact distances, nearest first
        rows = [ids.index(n.id) for n in h.neighbours]
        assert np.allclose([n.distance for n in h.neighbours], ((vectors[rows] - q) ** 2).sum(1), atol=1e-4)
        assert [n.distance for n in h.neighbours] == sorted(n.distance for n in h.neighbours)


def test_raw_ivf_search_falls_short_where_the_catalogue_does_not(data, catalogue):
    """nprobe 1 over small lists answers fewer than k: the catalogue widens until it has k."""
    index = catalogue.index
    faiss.extract_index_ivf(index).nprobe = 1
    try:
        _, raw = index.search(data["queries"][:50], 400)
    finally:
        faiss.extract_index_ivf(index).nprobe = catalogue.search_params["nprobe"]
    assert ((raw >= 0).sum(axis=1) < 400).any()
    assert all(len(h.neighbours) == 400 for h in catalogue.search(data["queries"][:50], 400))


def test_category_filters_return_k_from_the_filtered_set(data, catalogue):
    queries, vectors, ids, items = data["queries"], data["vectors"], data["ids"], data["items"]
    for chosen in (["coat"], ["bag", "dress"]):
        allowed = [i for i, it in enumerate(items) if it.category in chosen]
        hits = catalogue.search(queries, 10, categories=chosen)
        assert all(len(h.neighbours) == 10 and {n.category for n in h.neighbours} <= set(chosen) for h in hits)
        assert all(h.available == len(allowed) for h in hits)
        assert recall(ids_of(hits), exact_top(queries, vectors, 10, allowed), ids) >= 0.9


def test_a_small_category_is_searched_exactly(data, catalogue):
    queries, vectors, ids, items = data["queries"], data["vectors"], data["ids"], data["items"]
    allowed = [i for i, it in enumerate(items) if it.category == "rare"]
    assert len(allowed) <= EXACT_SCAN_UP_TO
    hits = catalogue.search(queries[:30], 10, categories=["rare"])
    assert ids_of(hits) == [[ids[r] for r in row] for row in exact_top(queries[:30], vectors, 10, allowed)]
    everything = catalogue.search(queries[:1], len(allowed) + 50, categories=["rare"])[0]
    assert len(everything.neighbours) == len(allowed) == everything.available and everything.complete


def test_excluded_ids_never_come_back_and_k_still_holds(data, catalogue):
    queries = data["queries"][:40]
    first = catalogue.search(queries, 10)
    leave_out = sorted({n.id for h in first for n in h.neighbours})
    hits = catalogue.search(queries, 10, exclude=leave_out)
    assert all(len(h.neighbours) == 10 and not {n.id for n in h.neighbours} & set(leave_out) for h in hits)
    coats = catalogue.search(queries, 10, categories=["coat"], exclude=leave_out)
    assert all(len(h.neighbours) == 10 and all(n.category == "coat" and n.id not in leave_out
                                               for n in h.neighbours) for h in coats)


def test_filters_that_match_nothing_are_refused_with_a_reason(data, catalogue):
    with pytest.raises(FilterError, match="no item matches.*empty"):
        catalogue.search(data["queries"][:1], 4, categories=["empty"])
    with pytest.raises(FilterError, match="unknown category 'hats'"):
        catalogue.search(data["queries"][:1], 4, categories=["hats"])
    rare = [it.id for it in data["items"] if it.category == "rare"]
    with pytest.raises(FilterError, match="every matching item is left out"):
        catalogue.search(data["queries"][:1], 4, categories=["rare"], exclude=rare)
    assert FilterError.status == 400 and isinstance(FilterError("x"), InputError)


def test_search_by_listing_uses_the_stored_vector_and_leaves_the_listing_out(data, catalogue):
    ids = data["ids"]
    listing = ids[123]
    hits = catalogue.search_by_listing(listing, 8)
    assert hits.listing == data["items"][123]
    assert len(hits.neighbours) == 8 and listing not in {n.id for n in hits.neighbours}
    expected = exact_top(data["vectors"][123:124], data["vectors"], 9)[0]
    assert ids[expected[0]] == listing  # the item is its own nearest neighbour, and is left out
    same = catalogue.search(catalogue.vector(listing), 8, exclude=[listing])[0]
    assert [n.id for n in same.neighbours] == [n.id for n in hits.neighbours]
    coats = catalogue.search_by_listing(listing, 5, categories=["coat"])
    assert all(n.category == "coat" for n in coats.neighbours) and len(coats.neighbours) == 5
    with pytest.raises(UnknownListingError, match="unknown listing id 'nope'") as error:
        catalogue.search_by_listing("nope", 4)
    assert isinstance(error.value, KeyError) and error.value.status == 404


def test_a_batch_of_requests_answers_each_one_or_its_error(data, catalogue):
    q = data["queries"]
    answers = catalogue.answer([
        SearchRequest(k=3, vector=q[0]),
        SearchRequest(k=5, vector=q[1], categories=("coat",)),
        SearchRequest(k=4, listing="missing-id"),
        SearchRequest(k=4, vector=q[2], categories=("empty",)),
        SearchRequest(k=6, listing=data["ids"][9], exclude=(data["ids"][10],)),
        SearchRequest(k=7, vector=q[3]),
    ])
    assert len(answers[0].neighbours) == 3 and len(answers[5].neighbours) == 7
    assert [n.id for n in answers[0].neighbours] == [n.id for n in catalogue.search(q[0], 3)[0].neighbours]
    assert all(n.category == "coat" for n in answers[1].neighbours) and len(answers[1].neighbours) == 5
    assert isinstance(answers[2], UnknownListingError) and isinstance(answers[3], FilterError)
    assert answers[4].listing.id == data["ids"][9] and len(answers[4].neighbours) == 6
    assert not {data["ids"][9], data["ids"][10]} & {n.id for n in answers[4].neighbours}


def test_memory_mapped_open_gives_identical_answers(data, catalogue):
    in_ram = open_catalogue(data["root"] / "v1", mmap=False)
    try:
        for kwargs in ({}, {"categories": ["shoe"]}, {"exclude": data["ids"][:50]}):
            a, b = catalogue.search(data["queries"], 10, **kwargs), in_ram.search(data["queries"], 10, **kwargs)
            assert [[(n.id, n.distance) for n in h.neighbours] for h in a] == \
                   [[(n.id, n.distance) for n in h.neighbours] for h in b]
    finally:
        in_ram.close()
    index_path = str((data["root"] / "v1" / INDEX_FILE).resolve())
    with open("/proc/self/maps") as maps:  # the index file is mapped into this process, not copied
        assert index_path in maps.read()


def test_update_adds_and_removes_without_retraining_or_touching_the_old_version(data, catalogue):
    root, vectors, ids = data["root"], data["vectors"], data["ids"]
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (root / "v1").iterdir()}
    old_answers = ids_of(catalogue.search(data["queries"][:20], 10))
    removed = ids[:300]
    new_vectors, new_clusters = synthetic(50, seed=3)
    new_items = make_items(50, new_clusters, prefix="new")
    new_items[0] = Item(new_items[0].id, "hats", "hats/new-00000.png")  # a new category
    manifest = update_catalogue(root / "v1", root / "v2", add_items=new_items, add_embeddings=new_vectors * 2.0,
                                remove_ids=removed, progress=False)
    assert manifest["count"] == N - 300 + 50 and manifest["version"] == 2 and manifest["key_space"] == N + 50
    assert manifest["parent"]["uid"] == data["manifest"]["uid"] and "hats" in manifest["categories"]
    assert before == {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (root / "v1").iterdir()}
    assert os.stat(root / "v1" / "vectors-00000.npy").st_ino == os.stat(root / "v2" / "vectors-00000.npy").st_ino

    v2 = open_catalogue(root / "v2")
    try:
        old_ivf, new_ivf = faiss.extract_index_ivf(catalogue.index), faiss.extract_index_ivf(v2.index)
        assert np.array_equal(faiss.vector_to_array(faiss.downcast_index(old_ivf.quantizer).codes),
                              faiss.vector_to_array(faiss.downcast_index(new_ivf.quantizer).codes))  # not retrained
        # removed ids never come back, even for their own vectors, a wide k, or by listing
        hits = v2.search(vectors[:300], 50)
        assert not {n.id for h in hits for n in h.neighbours} & set(removed)
        assert all(len(h.neighbours) == 50 for h in hits)
        with pytest.raises(UnknownListingError):
            v2.search_by_listing(removed[0], 4)
        # added items are found, by vector and by listing, with the new category
        added = v2.search(new_vectors[:10], 1)
        assert [h.neighbours[0].id for h in added] == [it.id for it in new_items[:10]]
        assert v2.search(new_vectors[:1], 1, categories=["hats"])[0].neighbours[0].id == "new-00000"
        assert v2.search_by_listing("new-00001", 3).listing.id == "new-00001"
    finally:
        v2.close()
    assert ids_of(catalogue.search(data["queries"][:20], 10)) == old_answers  # the old version still serves

    # a second update removes an added item and re-adds a removed id under a new key
    again = update_catalogue(root / "v2", root / "v3", remove_ids=["new-00001"],
                             add_items=[Item(removed[1], "coat", "coat/back.png")], add_embeddings=vectors[1:2],
                             progress=False)
    v3 = open_catalogue(root / "v3")
    try:
        assert again["key_space"] == N + 51 and v3.items.keys_of([removed[1]])[removed[1]] == N + 50
        assert "new-00001" not in {n.id for h in v3.search(new_vectors, 20) for n in h.neighbours}
    finally:
        v3.close()
    with pytest.raises(CatalogueError, match="not in the catalogue"):
        update_catalogue(root / "v2", root / "v9", remove_ids=[removed[0]], progress=False)
    with pytest.raises(CatalogueError, match="already in the catalogue"):
        update_catalogue(root / "v2", root / "v9", add_items=[new_items[2]], add_embeddings=new_vectors[2:3],
                         progress=False)
    assert not (root / "v9").exists() and not (root / ".v9.partial").exists()


def test_reindex_to_the_compact_profile_shares_files_and_keeps_recall(data):
    root = data["root"]
    manifest = reindex_catalogue(root / "v1", root / "compact", profile="compact", progress=False)
    assert manifest["factory"].startswith("PCA256,IVF") and manifest["search"]["k_factor"] > 1
    assert os.stat(root / "v1" / ITEMS_FILE).st_ino == os.stat(root / "compact" / ITEMS_FILE).st_ino
    compact = open_catalogue(root / "compact")
    try:
        hits = compact.search(data["queries"], 10)
        assert all(len(h.neighbours) == 10 for h in hits)
        assert recall(ids_of(hits), exact_top(data["queries"], data["vectors"], 10), data["ids"]) >= 0.85
    finally:
        compact.close()


def writable_copy(source, target):
    shutil.copytree(source, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def test_missing_truncated_or_swapped_files_are_refused_at_open(data, tmp_path):
    root = data["root"]
    missing = writable_copy(root / "v1", tmp_path / "missing")
    (missing / ITEMS_FILE).unlink()
    with pytest.raises(CatalogueError, match=f"{ITEMS_FILE} is missing"):
        open_catalogue(missing)

    truncated = writable_copy(root / "v1", tmp_path / "truncated")
    with open(truncated / INDEX_FILE, "r+b") as f:
        f.truncate(os.path.getsize(truncated / INDEX_FILE) - 4096)
    with pytest.raises(CatalogueError, match=f"{INDEX_FILE} is .* bytes.*truncated"):
        open_catalogue(truncated)

    # another catalogue of the same size and profile: its index file has exactly the same length
    other_vectors, other_clusters = synthetic(N, seed=5)
    publish_catalogue(tmp_path / "other", other_vectors, make_items(N, other_clusters), categories=CATEGORIES,
                      profile="accurate", progress=False)
    assert os.path.getsize(tmp_path / "other" / INDEX_FILE) == os.path.getsize(root / "v1" / INDEX_FILE)
    swapped = writable_copy(root / "v1", tmp_path / "swapped")
    shutil.copyfile(tmp_path / "other" / INDEX_FILE, swapped / INDEX_FILE)
    with pytest.raises(CatalogueError, match=f"{INDEX_FILE} is not the file .* swapped or modified"):
        open_catalogue(swapped)
    items_swapped = writable_copy(root / "v1", tmp_path / "items-swapped")
    shutil.copyfile(tmp_path / "other" / ITEMS_FILE, items_swapped / ITEMS_FILE)
    with pytest.raises(CatalogueError, match=ITEMS_FILE):
        open_catalogue(items_swapped)


def test_the_full_checksum_finds_what_the_cheap_check_cannot(data, tmp_path):
    """One flipped byte between the sampled blocks keeps the size and the fingerprint: open accepts it (the
    documented trade-off), and the publish-time verify refuses it."""
    flipped = writable_copy(data["root"] / "v1", tmp_path / "flipped")
    path = flipped / "vectors-00000.npy"
    offset = os.path.getsize(path) // 2 + 12_345  # not in a sampled block
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    open_catalogue(flipped).close()
    with pytest.raises(CatalogueError, match="vectors-00000.npy does not match its sha256"):
        verify_catalogue(flipped, progress=False)
    assert verify_catalogue(data["root"] / "v1", progress=False)["count"] == N


def test_publish_refuses_bad_input_and_leaves_no_partial_folder(tmp_path):
    vectors, clusters = synthetic(300, seed=11)
    items = make_items(300, clusters)
    bad = vectors.copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match="row 17 holds NaN"):
        publish_catalogue(tmp_path / "nan", bad, items, progress=False)
    with pytest.raises(ValueError, match="299 items for 300 embedding rows"):
        publish_catalogue(tmp_path / "short", vectors, items[:-1], categories=CATEGORIES, progress=False)
    twice = items[:-1] + [Item(items[0].id, "bag", "bag/x.png")]
    with pytest.raises(ValueError, match=f"duplicate item id '{items[0].id}'"):
        publish_catalogue(tmp_path / "dup", vectors, twice, progress=False)
    with pytest.raises(ValueError, match="category 'hats'"):
        publish_catalogue(tmp_path / "cat", vectors, [Item("a", "hats", "a.png")] + items[1:],
                          categories=CATEGORIES, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    publish_catalogue(tmp_path / "ok", vectors, items, progress=False)
    with pytest.raises(FileExistsError):
        publish_catalogue(tmp_path / "ok", vectors, items, progress=False)


def test_exact_profile_matches_brute_force(tmp_path):
    vectors, clusters = synthetic(2000, seed=12)
    items = make_items(2000, clusters)
    manifest = publish_catalogue(tmp_path / "small", vectors, items, progress=False)
    assert manifest["profile"] == "exact" and manifest["mmap_flag"] == "IO_FLAG_MMAP_IFC"
    queries, _ = synthetic(30, seed=13)
    small = open_catalogue(tmp_path / "small")
    try:
        hits = small.search(queries, 10)
        assert ids_of(hits) == [[items[r].id for r in row] for row in exact_top(queries, vectors, 10)]
        coats = [i for i, it in enumerate(items) if it.category == "coat"]
        hits = small.search(queries, 10, categories=["coat"])
        assert ids_of(hits) == [[items[r].id for r in row] for row in exact_top(queries, vectors, 10, coats)]
        assert len(small.search(queries[:1], 5000)[0].neighbours) == 2000  # fewer items than k: all, and says so
        assert small.search(queries[:1], 5000)[0].available == 2000
    finally:
        small.close()


def test_an_archive_reference_pins_the_catalogue_version(data):
    from visual_search.catalogue.store import catalogue_reference

    root = data["root"]
    reference = catalogue_reference(root / "v1")
    assert reference["uid"] == data["manifest"]["uid"] and reference["count"] == N
    open_catalogue(root / "v1", expect=reference).close()
    if not (root / "v2").exists():
        update_catalogue(root / "v1", root / "v2", remove_ids=[data["ids"][0]], progress=False)
    with pytest.raises(CatalogueError, match="not the catalogue this archive was built for: uid .*count"):
        open_catalogue(root / "v2", expect=reference)


def test_command_line_verifies_and_searches_by_listing(data, capsys):
    from visual_search.catalogue.__main__ import main

    folder = str(data["root"] / "v1")
    main(["verify", folder])
    assert f"ok: {folder}: " in capsys.readouterr().out
    main(["search", folder, "--listing", data["ids"][5], "-k", "3", "--category", "coat"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{data['ids'][5]} (") and len(lines) == 4
    assert all(" coat " in line for line in lines[1:])
    with pytest.raises(SystemExit, match="error: unknown listing id 'nope'"):
        main(["search", folder, "--listing", "nope"])
    with pytest.raises(SystemExit, match="error: catalogue folder not found: .*missing"):
        main(["info", str(data["root"] / "missing")])


@pytest.mark.parametrize("how", [{"profile": "exact"}, {"factory": "HNSW16"}, {"factory": "SQ8"},
                                 {"factory": "PQ32"}])
def test_updates_of_indexes_that_cannot_remove_in_place(tmp_path, how):
    """Flat is refilled from the stored vectors at its final size; HNSW cannot remove ids and is refilled too;
    trained flat codes (SQ8, PQ) keep their trained codec: the removed ids are gone and nothing is embedded again."""
    vectors, clusters = synthetic(3000, seed=21)
    items = make_items(3000, clusters)
    manifest = publish_catalogue(tmp_path / "v1", vectors, items, progress=False, **how)
    assert manifest["profile"] == how.get("profile", "custom")
    removed = [it.id for it in items[:40]]
    extra, extra_clusters = synthetic(5, seed=22)
    update_catalogue(tmp_path / "v1", tmp_path / "v2", remove_ids=removed,
                     add_items=make_items(5, extra_clusters, prefix="add"), add_embeddings=extra, progress=False)
    v2 = open_catalogue(tmp_path / "v2")
    try:
        assert v2.count == 3000 - 40 + 5
        hits = v2.search(vectors[:40], 20)
        assert all(len(h.neighbours) == 20 for h in hits)
        assert not {n.id for h in hits for n in h.neighbours} & set(removed)
        assert [h.neighbours[0].id for h in v2.search(extra, 1)] == [f"add-{i:05d}" for i in range(5)]
    finally:
        v2.close()


def test_an_update_that_would_leave_no_item_is_refused_and_writes_nothing(tmp_path):
    vectors, clusters = synthetic(50, seed=23)
    items = make_items(50, clusters)
    publish_catalogue(tmp_path / "v1", vectors, items, profile="exact", progress=False)
    with pytest.raises(CatalogueError, match="no item would be left"):
        update_catalogue(tmp_path / "v1", tmp_path / "v2", remove_ids=[it.id for it in items], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_the_keys_of_a_small_filtered_set_come_without_unpacking_the_whole_bitmap():
    """At 10^8 keys a category bitmap is 12.5 MB; unpacked to one byte per key it would be 100 MB per request."""
    import tracemalloc

    from visual_search.catalogue.filters import Selection, category_bitmaps, set_keys

    key_space = 100_000_000
    bitmap = np.zeros((key_space + 7) // 8, dtype=np.uint8)
    chosen = np.sort(np.random.default_rng(3).choice(key_space, 200, replace=False))
    bitmap[chosen >> 3] |= (1 << (chosen & 7)).astype(np.uint8)
    tracemalloc.start()
    try:
        keys = Selection(count=200, total=key_space, bitmap=bitmap, excluded=chosen[:2]).keys(bitmap)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keys.tolist() == chosen[2:].tolist()
    assert peak < 1_000_000, peak
    codes = np.random.default_rng(4).integers(-1, 3, 1000)
    for code, row in enumerate(category_bitmaps(codes, 3, 1000)):
        assert set_keys(row).tolist() == np.flatnonzero(codes == code).tolist()
