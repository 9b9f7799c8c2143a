"""A short (5 s) headless Locust run against the test TorchServe: the suite works and no request fails."""
from loadtests.run import main as run_loadtest
from loadtests.run import read_counts
from tests.conftest import MODEL_NAME


def test_short_headless_locust_run_has_no_failures(torchserve, tmp_path):
    code = run_loadtest(["--host", torchserve.urls["inference"], "--state-dir", str(torchserve.state_dir),
                         "--model", MODEL_NAME, "--users", "3", "--spawn-rate", "3", "--run-time", "5s",
                         "--mix", "similar=0.7,embedding=0.3", "--max-p95-ms", "60000", "--results-dir",
                         str(tmp_path), "--name", "smoke"])
    assert code == 0
    assert (tmp_path / "smoke.html").stat().st_size > 0 and (tmp_path / "smoke_stats.csv").is_file()
    counts = read_counts(tmp_path / "smoke")
    assert set(counts) == {"similar", "embedding"}, counts  # each user walks the mix from its own start
    assert all(c["requests"] > 0 and c["failures"] == 0 for c in counts.values()), counts


def test_the_run_fails_when_p95_passes_the_bound(torchserve, tmp_path):
    code = run_loadtest(["--host", torchserve.urls["inference"], "--state-dir", str(torchserve.state_dir),
                         "--model", MODEL_NAME, "--users", "1", "--spawn-rate", "1", "--run-time", "3s",
                         "--max-p95-ms", "0.001", "--results-dir", str(tmp_path), "--name", "bound"])
    assert code != 0
