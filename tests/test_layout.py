"""The layout's promises: the archive ships what the handler imports and nothing of training; the core imports no
tool, front or TorchServe (but for its metrics module); library modules do not call the orchestration layer."""
import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from serving.build_archive import handler_modules
from serving.torchserve import ROOT
from tests.conftest import MODEL_NAME

ORCHESTRATORS = {"training/next_version.py"}  # may call serving.build_archive and the management client

IMPORTS_OF_THE_HANDLER = """
import sys
import torch, torchvision, faiss  # what every worker loads anyway
from ts.torch_handler.base_handler import BaseHandler  # imports openvino.torch itself when openvino is installed
watched = lambda: {name for name in sys.modules if name.startswith("torch.distributed")
                   or name.split(".")[0] in ("openvino", "nncf")}
before = watched()
from visual_search_handler import VisualSearchHandler
import visual_search
assert visual_search.__file__.startswith(sys.argv[1]), visual_search.__file__
added = sorted(watched() - before)
print(sorted(name for name in sys.modules if name.split(".")[0] in ("matplotlib", "training", "serving", "web",
                                                                      "nncf")))
print(added)
"""


def imported_modules(path):
    """The absolute module names a Python file imports (relative imports resolved against its package)."""
    tree, names = ast.parse(Path(path).read_text()), set()
    package = ".".join(Path(path).relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
    return names


def python_files(folder):
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_archive_ships_exactly_what_the_handler_imports_and_nothing_of_training(model_store):
    with zipfile.ZipFile(model_store / f"{MODEL_NAME}.mar") as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".py") and name != "visual_search_handler.py"}
    assert shipped == {str(path) for path in handler_modules()}
    assert not {name for name in shipped if not name.startswith("visual_search/")}
    for writer in ("visual_search/catalogue/build.py", "visual_search/catalogue/__main__.py", "visual_search/cli.py"):
        assert writer not in shipped, writer


def test_importing_the_handler_loads_no_plotting_no_tools_no_distributed_training_and_no_openvino(model_store,
                                                                                                   tmp_path):
    with zipfile.ZipFile(model_store / f"{MODEL_NAME}.mar") as archive:
        archive.extractall(tmp_path)
    result = subprocess.run([sys.executable, "-c", IMPORTS_OF_THE_HANDLER, str(tmp_path)], cwd=tmp_path,
                            env={"PYTHONPATH": str(tmp_path), "PATH": ""}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tools, distributed = result.stdout.strip().splitlines()[-2:]
    assert tools == "[]" and distributed == "[]", result.stdout


def test_the_core_imports_no_tool_no_front_and_torchserve_only_for_its_metrics():
    for path in python_files("visual_search"):
        outside = {name for name in imported_modules(path) if name.split(".")[0] in ("training", "serving", "web",
                                                                                         "loadtests", "ts")}
        expected = {"ts.metrics.dimension", "ts.metrics.metric_type_enum"} if path.name == "metrics.py" else set()
        assert outside == expected, (path, outside)


def test_only_the_handler_and_the_metrics_module_import_torchserve():
    for folder in ("visual_search", "training", "serving", "web", "loadtests", "deploy"):
        for path in python_files(folder):
            uses_ts = {name for name in imported_modules(path) if name.split(".")[0] == "ts"}
            assert not uses_ts or path == ROOT / "visual_search" / "metrics.py", (path, uses_ts)
    assert "ts.torch_handler.base_handler" in imported_modules(ROOT / "handler" / "visual_search_handler.py")


def test_library_modules_do_not_call_the_orchestration_layer():
    """Training tools are library code but for the orchestrators; the front reads TorchServe's state through
    serving.torchserve only; nothing imports tests or benchmarks but tests and benchmarks."""
    for path in python_files("training"):
        uses = {name for name in imported_modules(path) if name.split(".")[0] == "serving"}
        relative = str(path.relative_to(ROOT))
        assert not uses or relative in ORCHESTRATORS, (relative, uses)
    for path in python_files("web"):
        uses = {name for name in imported_modules(path) if name.split(".")[0] == "serving"}
        assert uses <= {"serving.torchserve"}, (path, uses)
    for folder in ("visual_search", "training", "serving", "web", "loadtests", "deploy", "handler"):
        for path in python_files(folder):
            uses = {name for name in imported_modules(path) if name.split(".")[0] in ("tests", "benchmarks")}
            assert not uses, (path, uses)


def test_module_docstrings_are_short_and_undated():
    import re

    for folder in ("visual_search", "training", "serving", "web", "loadtests", "deploy", "handler"):
        for path in python_files(folder):
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert len(docstring.splitlines()) <= 5 or path.name == "__main__.py", (path, len(docstring.splitlines()))
            assert not re.search(r"\b20\d\d-\d\d-\d\d\b|issue \d+", path.read_text()), path


def test_the_package_declares_its_tools(tmp_path):
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for script, target in project["project"]["scripts"].items():
        module, function = target.split(":")
        code = f"import importlib; assert callable(getattr(importlib.import_module({module!r}), {function!r}))"
        assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 0, script
    assert json.loads(json.dumps(project["tool"]["ruff"]))["line-length"] == 120
