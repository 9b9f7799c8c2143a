"""The FAISS index: index_factory strings, FAISS's own file format, validation on load."""
import faiss
import numpy as np
import pytest

from visual_search.index import build_index, l2_normalize, load_index, save_index, search


@pytest.fixture
def vectors():
    return l2_normalize(np.random.default_rng(0).normal(size=(300, 2048)).astype(np.float32))


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_round_trip_gives_the_same_answers(vectors, tmp_path, factory):
    index = build_index(vectors, factory)
    save_index(index, tmp_path / "catalogue.faiss")
    loaded = load_index(tmp_path / "catalogue.faiss", expected_count=300)
    before, after = search(index, vectors[:10], 4), search(loaded, vectors[:10], 4)
    assert np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0])


def test_exact_index_finds_each_vector_first(vectors):
    distances, positions = search(build_index(vectors), vectors[:20], 4)
    assert list(positions[:, 0]) == list(range(20))
    assert np.allclose(distances[:, 0], 0.0, atol=1e-4)
    assert (np.diff(distances, axis=1) >= 0).all()


def test_fewer_items_than_k_pads_with_minus_one(vectors):
    _, positions = search(build_index(vectors[:2]), vectors[:1], 4)
    assert list(positions[0][2:]) == [-1, -1]


def test_wrong_dimension_and_count_fail_loudly(vectors, tmp_path):
    with pytest.raises(ValueError, match="2048"):
        build_index(vectors[:, :512])
    faiss.write_index(faiss.IndexFlatL2(1000), str(tmp_path / "small.faiss"))
    with pytest.raises(ValueError, match="dimension 1000"):
        load_index(tmp_path / "small.faiss")
    save_index(build_index(vectors), tmp_path / "ok.faiss")
    with pytest.raises(ValueError, match="300 vectors but the catalogue has 299"):
        load_index(tmp_path / "ok.faiss", expected_count=299)
    with pytest.raises(ValueError, match="index_factory"):
        build_index(vectors, "NoSuchIndex42")


def test_unit_length_rows():
    rows = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
    assert np.allclose(rows[0], [0.6, 0.8]) and np.allclose(rows[1], [0.0, 0.0])
