"""training.evaluate: precision@k counts only the results returned and says how many queries fell short; an IVF
catalogue searching one list per query still answers exactly k."""
import json

import numpy as np
import pytest

from training.build_index import EMBEDDINGS_FILE
from training.evaluate import main as evaluate
from training.evaluate import retrieval_metrics
from training.publish import publish_bundle
from visual_search.bundle import load_bundle
from visual_search.items import read_csv


def test_missing_results_are_misses():
    queries = np.array(["shoes", "bags"])
    found = [["shoes"], ["bags", "phones", "bags", "shoes"]]  # the first query got 1 result of 4
    precision, per_category, short = retrieval_metrics(queries, found, 4)
    assert per_category == {"bags": 0.5, "shoes": 0.25}
    assert precision == pytest.approx(0.375) and short == 1


@pytest.fixture(scope="module")
def one_item_per_list_bundle(bundle_dir, tmp_path_factory):
    """The session catalogue in an IVF index with one list per item, searched with nprobe 1: one list holds one
    item, so only the catalogue's widening can answer k."""
    source = load_bundle(bundle_dir)
    items = source.catalogue.all_items()
    out = tmp_path_factory.mktemp("ivf") / "bundle"
    publish_bundle(out, model=source.model, categories=source.categories, preprocess=source.preprocess, items=items,
                   embeddings=bundle_dir / EMBEDDINGS_FILE, normalize=source.normalize,
                   factory=f"IVF{len(items)},Flat", search={"nprobe": 1}, progress=False)
    return out


def test_evaluate_with_one_list_per_item_still_gets_k(one_item_per_list_bundle, bundle_dir, trained_run, photo_dir,
                                                      tmp_path):
    out = tmp_path / "evaluation.json"
    common = ["--data-dir", str(photo_dir), "--queries", str(trained_run / "val.csv"), "--k", "4", "--workers", "0"]
    result = evaluate(["--bundle", str(one_item_per_list_bundle), *common, "--out", str(out)])
    exact = evaluate(["--bundle", str(bundle_dir), *common, "--out", str(tmp_path / "exact.json")])
    queries = read_csv(trained_run / "val.csv")
    assert json.loads(out.read_text()) == result
    assert result["queries"] == len(queries) and result["catalogue_items"] == 24
    assert result["index"]["factory"] == "IVF24,Flat" and result["index"]["search"]["nprobe"] == 1
    assert result["queries_short_of_k"] == 0
    # IVF with flat codes, widened over every list until k are found: the same neighbours as exact search
    assert result["precision_at_4"] == pytest.approx(exact["precision_at_4"])


def test_evaluate_with_an_exact_index_has_no_short_queries(bundle_dir, trained_run, photo_dir, tmp_path):
    result = evaluate(["--bundle", str(bundle_dir), "--data-dir", str(photo_dir), "--queries",
                       str(trained_run / "val.csv"), "--k", "4", "--workers", "0", "--out",
                       str(tmp_path / "evaluation.json")])
    assert result["queries_short_of_k"] == 0
    assert 0.25 <= result["precision_at_4"] <= 1.0  # at least the query itself is found
    assert 0.0 <= result["test_accuracy"] <= 1.0
