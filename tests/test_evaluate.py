"""training.evaluate: precision@k counts only the results the index returned, and says how many queries fell short."""
import json

import faiss
import numpy as np
import pytest

from training.build_index import EMBEDDINGS_FILE
from training.evaluate import main as evaluate, retrieval_metrics
from visual_search.bundle import load_bundle, write_bundle
from visual_search.catalogue import read_csv
from visual_search.index import build_index


def test_missing_results_are_misses_not_the_last_item():
    queries = np.array(["shoes", "bags"])
    catalogue = np.array(["bags", "phones", "shoes"])  # FAISS's -1 would index the last item, "shoes"
    positions = np.array([[2, -1, -1, -1], [0, 1, 0, 2]])
    precision, per_category, short = retrieval_metrics(queries, catalogue, positions)
    assert per_category == {"bags": 0.5, "shoes": 0.25}
    assert precision == pytest.approx(0.375) and short == 1


@pytest.fixture(scope="module")
def one_item_per_list_bundle(bundle_dir, tmp_path_factory):
    """The session catalogue in an IVF index with one list per item: with nprobe 1 a query gets one result."""
    source = load_bundle(bundle_dir)
    embeddings = np.load(bundle_dir / EMBEDDINGS_FILE)
    factory = f"IVF{len(source.items)},Flat"
    index = build_index(embeddings, factory)
    faiss.extract_index_ivf(index).nprobe = 1  # saved with the index: one list, one item, per query
    out = tmp_path_factory.mktemp("ivf") / "bundle"
    write_bundle(out, model=source.model, categories=source.categories, preprocess=source.preprocess, index=index,
                 items=source.items, index_factory=factory, normalize=source.normalize)
    return out


def test_evaluate_with_an_index_that_returns_fewer_than_k(one_item_per_list_bundle, trained_run, photo_dir,
                                                          tmp_path, capsys):
    out = tmp_path / "evaluation.json"
    result = evaluate(["--bundle", str(one_item_per_list_bundle), "--data-dir", str(photo_dir), "--queries",
                       str(trained_run / "val.csv"), "--k", "4", "--workers", "0", "--out", str(out)])
    queries = read_csv(trained_run / "val.csv")
    assert json.loads(out.read_text()) == result
    assert result["queries"] == len(queries) and result["catalogue_items"] == 24
    # Each query (a catalogue photo itself) finds exactly one item, itself: 1 hit of 4, never 4 of 4.
    assert result["queries_short_of_k"] == len(queries)
    assert result["precision_at_4"] == pytest.approx(0.25)
    assert all(p == pytest.approx(0.25) for p in result["precision_at_4_per_category"].values())
    assert f"{len(queries)} of {len(queries)} queries got fewer than 4 results" in capsys.readouterr().out


def test_evaluate_with_an_exact_index_has_no_short_queries(bundle_dir, trained_run, photo_dir, tmp_path):
    result = evaluate(["--bundle", str(bundle_dir), "--data-dir", str(photo_dir), "--queries",
                       str(trained_run / "val.csv"), "--k", "4", "--workers", "0", "--out",
                       str(tmp_path / "evaluation.json")])
    assert result["queries_short_of_k"] == 0
    assert 0.25 <= result["precision_at_4"] <= 1.0  # at least the query itself is found
    assert 0.0 <= result["test_accuracy"] <= 1.0
