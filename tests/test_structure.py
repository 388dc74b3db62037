"""How the package is put together: imports run one way, the core needs no torch, the wheel
ships no test tooling."""

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import synthetic_cache

PACKAGE = Path(__file__).resolve().parents[1] / "featcache"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the featcache modules it imports, at the top or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*stack, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"featcache.backbones.identity", "featcache.backbones.build", "featcache.cli.app"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check finds one when there is one


def test_every_module_imports_alone():
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m.startswith('featcache')]: del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    names = sorted(import_graph())
    subprocess.run([sys.executable, "-c", code, *names], check=True, capture_output=True, text=True)


TORCH_FREE = [
    "featcache.images",
    "featcache.preprocessing",
    "featcache.families",
    "featcache.evaluate",
    "featcache.backbones",
    "featcache.backbones.identity",
    "featcache.backbones.registry",
    "featcache.backbones.weights",
    "featcache.cache",
    "featcache.fit",
    "featcache.models",
    "featcache.report",
    "featcache.bundle",
    "featcache.predictor",
    "featcache.cli",
    "featcache.cli.commands",
    "featcache.embedding",
    "featcache.distributed",
    "featcache.backbones.timm_any",
    "featcache.extract",
    "featcache.choose",
]


def _parameters(node: ast.FunctionDef) -> int:
    a = node.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
    return n - bool(a.args and a.args[0].arg in ("self", "cls"))


def long_signatures(source: str) -> list[str]:
    """Functions of ``source`` with more than 8 parameters, but click commands and scikit-learn
    estimators' constructors (whose parameters are the estimator's, by scikit-learn's contract)."""
    found = []
    for cls in [None, *(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef))]:
        body = ast.parse(source).body if cls is None else cls.body
        bases = [ast.unparse(b) for b in cls.bases] if cls is not None else []
        estimator = any(b.endswith(("Estimator", "Mixin")) for b in bases)
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _parameters(node) <= 8:
                continue
            if any("command" in ast.unparse(d) for d in node.decorator_list):
                continue
            if estimator and node.name == "__init__":
                continue
            found.append(f"{node.name} ({_parameters(node)})")
    return found


def test_no_function_takes_more_than_eight_parameters():
    assert long_signatures("def f(a, b, c, d, e, f, g, h, i): pass") == ["f (9)"]  # the check finds one
    assert long_signatures("def f(a, b, c, d, e, f, g, h, **more): pass") == ["f (9)"]
    too_long = {
        str(path.relative_to(PACKAGE.parent)): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if (found := long_signatures(path.read_text()))
    }
    assert too_long == {}


def test_the_image_loader_imports_no_backbone():
    code = "import sys, featcache.images; print([m for m in sys.modules if m.startswith('featcache.backb')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not {m for m in import_graph()["featcache.images"] if m.startswith("featcache.backbones")}


def test_python_m_featcache_and_python_cli_py_are_the_command():
    root = PACKAGE.parent
    for cmd in ([sys.executable, "-m", "featcache", "--version"], [sys.executable, "cli.py", "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=True).stdout
        assert out.startswith("featcache, version "), out


def test_one_process_extraction_imports_no_dask():
    code = "import sys, featcache.cli, featcache.extract; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_core_imports_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_info_fit_evaluate_and_plot_on_a_cache_leave_torch_out(tmp_path):
    cache = synthetic_cache(tmp_path / "features.h5")
    code = (
        "import sys, json\n"
        "from featcache.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)))\n"
    )
    commands = [
        ["info", str(cache)],
        ["fit", str(cache), "--cv", "3", "-o", str(tmp_path / "models")],  # all three families
        ["evaluate", str(cache), "--model-path", str(tmp_path / "models")],
        ["plot", str(cache), "--method", "pca"],
    ]
    run = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "embedding.png").is_file()  # beside the cache


def test_the_wheel_holds_no_test_tooling(tmp_path):
    root = PACKAGE.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(root)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("featcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "featcache/cli/__init__.py" in names and "featcache/backbones/build.py" in names
    assert not [n for n in names if "testing" in n or n.startswith("tests/") or "/support/" in n], names


def test_every_package_the_code_imports_is_declared():
    import importlib.metadata
    import re

    from setuptools.config.setupcfg import read_configuration

    declared = {
        re.split(r"[\[<>=!~; ]", r)[0].lower().replace("_", "-")
        for r in read_configuration(PACKAGE.parent / "setup.cfg")["options"]["install_requires"]
    }
    declared |= {"distributed"} if "dask" in declared else set()  # dask[distributed] brings it
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"featcache"}
    distributions = importlib.metadata.packages_distributions()
    missing = {
        name: distributions.get(name)
        for name in third_party
        if not {d.lower().replace("_", "-") for d in distributions.get(name, [name])} & declared
    }
    assert missing == {}
