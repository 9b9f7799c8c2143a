"""The FAISS index: profiles, index_factory strings, FAISS's own file format, memory-mapped opening."""
import faiss
import numpy as np
import pytest

from visual_search.catalogue.index import mmap_flag_for, new_index, open_index, save_index
from visual_search.catalogue.vectors import l2_normalize


@pytest.fixture
def vectors():
    return l2_normalize(np.random.default_rng(0).normal(size=(300, 2048)).astype(np.float32))


def filled(factory, vectors):
    index = new_index(factory)
    if not index.is_trained:
        index.train(vectors)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64) * 3)  # ids are keys, not positions
    return index


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat", "IVF4,SQ8"])
def test_round_trip_in_faiss_format_gives_the_same_answers_mapped_or_not(vectors, tmp_path, factory):
    index = filled(factory, vectors)
    save_index(index, tmp_path / "index.faiss")
    before = index.search(vectors[:10], 4)
    for flag in (None, mmap_flag_for(index)):
        loaded = open_index(tmp_path / "index.faiss", flag)
        after = loaded.search(vectors[:10], 4)
        assert loaded.ntotal == 300 and np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0])


def test_an_exact_index_finds_each_vector_first_by_its_key(vectors):
    distances, keys = filled("Flat", vectors).search(vectors[:20], 4)
    assert list(keys[:, 0]) == [3 * i for i in range(20)]
    assert np.allclose(distances[:, 0], 0.0, atol=1e-4)
    assert (np.diff(distances, axis=1) >= 0).all()


def test_unknown_factory_strings_and_mmap_flags_fail_loudly(vectors, tmp_path):
    with pytest.raises(ValueError, match="index_factory"):
        new_index("NoSuchIndex42")
    save_index(filled("Flat", vectors), tmp_path / "ok.faiss")
    with pytest.raises(ValueError, match="unknown mmap flag"):
        open_index(tmp_path / "ok.faiss", "IO_FLAG_EVERYTHING")


def test_unit_length_rows():
    rows = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
    assert np.allclose(rows[0], [0.6, 0.8]) and np.allclose(rows[1], [0.0, 0.0])


def test_profiles_are_chosen_by_size_and_carry_their_search_parameters():
    from visual_search.catalogue.index import ivf_lists, plan_index

    assert plan_index(6000).profile == "exact" and plan_index(6000).factory == "Flat"
    big = plan_index(1_000_000)
    assert big.profile == "accurate" and big.factory == f"IVF{ivf_lists(1_000_000)},SQ8"
    assert 1 <= big.search["nprobe"] <= ivf_lists(1_000_000) and big.search["k_factor"] >= 1
    compact = plan_index(1_000_000, profile="compact")
    assert compact.factory.startswith("PCA256,IVF") and compact.search["k_factor"] > big.search["k_factor"]
    assert plan_index(200_000_000).profile == "compact" and "_HNSW32" in plan_index(200_000_000).factory
    assert "quantizer_efSearch" in plan_index(200_000_000).search
    assert plan_index(50_000, profile="accurate", search={"nprobe": 3}).search["nprobe"] == 3


def test_any_factory_string_still_works_and_ivf_never_defaults_to_one_list():
    from visual_search.catalogue.index import plan_index

    custom = plan_index(100_000, factory="IVF4096,PQ64")
    assert custom.profile == "custom" and custom.search["nprobe"] == 64 and custom.search["k_factor"] == 2
    assert plan_index(100_000, factory="IVF256,Flat").search == {"nprobe": 8}
    assert plan_index(100_000, factory="HNSW32").search["efSearch"] == 64
    with pytest.raises(ValueError, match="index_factory"):
        plan_index(100, factory="NoSuchIndex42")
    with pytest.raises(ValueError, match="unknown index profile 'fast'"):
        plan_index(100, profile="fast")
    with pytest.raises(ValueError, match="unknown search parameters"):
        plan_index(100, search={"nprob": 4})
    with pytest.raises(ValueError, match="positive integer"):
        plan_index(100, search={"nprobe": 0})


def test_search_parameters_reach_the_ivf_inside_wrappers(vectors):
    from visual_search.catalogue.index import new_index, search_parameters

    index = new_index("PCA64,IVF8,Flat")
    index.train(vectors)
    index.add_with_ids(vectors, np.arange(300, dtype=np.int64) * 10)
    keep = np.arange(0, 3000, 20, dtype=np.int64)  # every other id
    params, refs = search_parameters(index, faiss.IDSelectorBatch(keep), nprobe=8)
    _, found = index.search(vectors[:5], 20, params=params)
    assert (found >= 0).all() and np.isin(found, keep).all()
    flat = new_index("Flat")
    assert isinstance(flat, faiss.IndexIDMap)
    flat.add_with_ids(vectors, np.arange(300, dtype=np.int64) + 1000)
    params, refs = search_parameters(flat, faiss.IDSelectorRange(1000, 1010))
    _, found = flat.search(vectors[:1], 20, params=params)
    assert sorted(found[0][found[0] >= 0]) == list(range(1000, 1010))
