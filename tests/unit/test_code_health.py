"""The code-health rules of issue 10, checked so they stay true."""

from __future__ import annotations

import ast
import functools
import inspect
import os
from pathlib import Path

import pytest

import bot
from bot import errors
from bot.cli import main
from bot.util.fsutil import atomic_write_text
from bot.util.text import normalise

ROOT = Path(bot.__file__).resolve().parent.parent
LIBRARY = sorted([*(ROOT / "bot").rglob("*.py"), *(ROOT / "demo").rglob("*.py")])


@functools.cache  # several rules walk the same modules
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def test_every_bot_error_is_a_value_error():
    family = [obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, errors.BotError)]
    assert len(family) >= 6
    for cls in family:
        assert issubclass(cls, ValueError), cls
    with pytest.raises(ValueError):
        raise errors.SpecError("x")


def test_only_the_cli_knows_argparse():
    users = []
    for path in LIBRARY:
        for node in ast.walk(_tree(path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "argparse" for n in names):
                users.append(path.relative_to(ROOT).as_posix())
    assert users == ["bot/cli.py"]


def test_no_class_is_longer_than_250_lines():
    long = {f"{path.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
            for path in LIBRARY for node in ast.walk(_tree(path))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250}
    assert long == {}


def test_package_code_does_not_read_the_tests_folder():
    for path in LIBRARY:
        text = path.read_text(encoding="utf-8")
        assert '"tests"' not in text and "tests/data" not in text, path


@pytest.mark.parametrize("module, name", [
    ("bot.eval.evaluate", "run_eval"), ("bot.eval.bench", "run_bench"), ("bot.eval.bench_report", "render"),
    ("bot.chat", "run_terminal_chat"), ("bot.model.info", "backbone_info"), ("bot.manifests.add", "add_adapter"),
    ("demo.app", "launch"),
])
def test_library_entry_points_take_keyword_arguments(module, name):
    import importlib

    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    assert params and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name
    assert "args" not in {p.name for p in params}


def test_backbone_info_and_add_adapter_with_keywords(tmp_path, monkeypatch):
    from helpers import make_tiny_backbone

    from bot.manifests.add import add_adapter
    from bot.model.info import backbone_info

    data = tmp_path / "pets.csv"
    data.write_text("text,label\n" + "".join(f"meow {i},cat\nwoof {i},dog\n" for i in range(6)))
    path = add_adapter(name="pets", source=data, adapters_dir=tmp_path / "adapters")
    assert path == tmp_path / "adapters" / "pets" / "adapter.yaml" and path.exists()
    monkeypatch.setattr("bot.model.backbone.Backbone.load", classmethod(lambda cls, name=None, **kw: make_tiny_backbone()))
    text = backbone_info(adapters_dir=tmp_path / "adapters")
    assert "tiny-llama@" in text
    assert "pets" in text and "not trained yet" in text


def _write_manifest(folder: Path, name: str) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter.yaml").write_text(
        f"name: '{name}'\nkind: classify\nlabels: [ham, spam]\ndata: {{bundled: sms_spam}}\n")


@pytest.mark.parametrize("command", [["eval", "--no-router"], ["list"], ["train", "1spam"]])
def test_an_invalid_adapter_name_is_a_clear_error_not_a_traceback(tmp_path, capsys, command):
    _write_manifest(tmp_path / "1spam", "1spam")
    assert main([*command, "--adapters-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "'1spam'" in err and "key 'name'" in err and "Fix:" in err


def test_the_router_refuses_a_bad_route_name_with_a_bot_error():
    from helpers import HashEncoder

    from bot.routing import Router

    router = Router(HashEncoder())
    for name in ("1spam", "help", "", "a b"):
        with pytest.raises(errors.SpecError):
            router.add_route(name, ["win a prize"])
    with pytest.raises(ValueError, match="1spam"):  # a BotError is still a ValueError
        Router(HashEncoder(), fallback="1spam")


def test_atomic_write_text_replaces_whole_files_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "report.md"
    atomic_write_text(target, "old")
    assert target.read_text() == "old" and oct(target.stat().st_mode & 0o777) == "0o644"

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


def test_one_normaliser():
    from bot.manifests.data import example_key

    assert normalise("  Hello\t\nWORLD  ") == "hello world"
    assert example_key({"text": "A  b\nC"}) == normalise("a b c")
    assert example_key({"prompt": "Hi  There", "reply": "x"}) == "hi there"


def test_an_unwritable_path_is_an_error_message(tmp_path, capsys):
    data = tmp_path / "pets.csv"
    data.write_text("text,label\n" + "".join(f"meow {i},cat\nwoof {i},dog\n" for i in range(6)))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert main(["add", "pets", "--from", str(data), "--adapters-dir", str(not_a_folder)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # a data warning (few rows per label) may come first
    assert last.startswith("error: ") and str(not_a_folder) in last and "Traceback" not in err


# ------------------------------------------------------------------ layout (issue 24)
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in LIBRARY if p.is_relative_to(ROOT / "bot")}


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The bot modules an import statement loads, with their parent packages (but the root
    ``bot``, the public facade that every module loads first)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts) + 1) if parts[0] == "bot"}
    return sorted(m for m in out if m in MODULES and m != module and not module.startswith(m + "."))


def import_graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    """Which bot module imports which: every import statement, in function bodies too."""
    return {m: {t for node in ast.walk(_tree(p)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for t in _imported(m, node)} for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as [a, b, ..., a], or [] when there is none (depth-first)."""
    state, path = {}, []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    assert _imported("bot.tasks.classify", ast.parse("from bot.engine.pooling import pool").body[0]) \
        == ["bot.engine", "bot.engine.pooling"]


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert len(graph) > 80 and "bot.routing.route_data" in graph["bot.routing.build"]
    assert find_cycle(graph) == []


def test_no_two_modules_share_a_file_name():
    names = [p.name for p in MODULES.values() if p.name != "__init__.py"]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def _lazy_imports_unexplained(path: Path) -> list[int]:
    """Lines of imports in function bodies that no ``# lazy: ...`` comment explains: on the
    import, on the line above it, or above the run of imports it belongs to (blank lines apart)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = set()
    for fn in ast.walk(_tree(path)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        explained, prev = False, None
        for node in sorted((n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))),
                           key=lambda n: n.lineno):
            in_run = prev is not None and all(not line.strip() for line in lines[prev.end_lineno:node.lineno - 1])
            own = "# lazy:" in " ".join(lines[node.lineno - 2:node.end_lineno])
            explained = own or (in_run and explained)
            if not explained:
                out.add(node.lineno)
            prev = node
    return sorted(out)


def test_imports_stand_at_the_top_unless_a_comment_says_why(tmp_path):
    """An import in a function body says why (a heavy library, or keeping ``bot --help`` fast);
    every other import stands at the top of its module."""
    assert {str(p.relative_to(ROOT)): lines for p in MODULES.values() if (lines := _lazy_imports_unexplained(p))} == {}
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    # lazy: heavy\n    import a\n\n    import b\n    x = 1\n    import c\n")
    assert _lazy_imports_unexplained(sample) == [7]
def test_every_exception_class_lives_in_errors():
    elsewhere = [f"{path.relative_to(ROOT)}:{node.name}" for path in MODULES.values() if path.name != "errors.py"
                 for node in ast.walk(_tree(path)) if isinstance(node, ast.ClassDef)
                 and any(isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id in
                         {"ServeError", "BotError", "QueueFull", "UnknownModel"}) for b in node.bases)]
    assert elsewhere == []


# ------------------------------------------------------------------ the tests' own layout (issue 24)
TEST_FILES = sorted((ROOT / "tests").rglob("*.py"))


def _test_module_imports(source: str) -> list[str]:
    """The test modules (``test_*``, ``conftest``) that ``source`` imports, at the top or in a
    function body; shared code belongs in tests/helpers.py."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or "", *(f"{node.module}.{a.name}" if node.module else a.name for a in node.names)]
        else:
            continue
        found += [n for n in names if n.split(".")[-1].startswith("test_") or n.split(".")[-1] == "conftest"]
    return found


def test_the_test_import_finder_finds_imports_of_test_modules():
    assert _test_module_imports("import os\nfrom test_router import HashEncoder\n") == ["test_router"]
    assert _test_module_imports("def f():\n    import test_add_flow as flow\n") == ["test_add_flow"]
    assert _test_module_imports("from conftest import make_tiny_backbone\n") == ["conftest"]
    assert _test_module_imports("from tests.unit.serve import test_api\n") == ["tests.unit.serve.test_api"]
    assert _test_module_imports("from . import test_api\n") == ["test_api"]
    assert _test_module_imports("from helpers import make_router\nfrom bot.tasks import task_class\n") == []


def test_no_test_module_imports_another():
    assert len(TEST_FILES) > 40 and ROOT / "tests" / "helpers.py" in TEST_FILES
    imports = {str(p.relative_to(ROOT)): found for p in TEST_FILES
               if (found := _test_module_imports(p.read_text(encoding="utf-8")))}
    assert imports == {}


def test_tests_mirror_the_package_and_no_two_share_a_file_name():
    """pytest imports test files by their base name (rootdir-relative, no packages): two modules of
    one name would collide. tests/unit/<package>/ only for packages that bot/ has."""
    tests = [p for p in TEST_FILES if p.name.startswith("test_")]
    names = [p.name for p in tests]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
    packages = {p.parent.name for p in MODULES.values() if p.name == "__init__.py"} | {"demo"}
    folders = {p.parent.relative_to(ROOT / "tests").parts for p in tests}
    assert all(f in {("unit",), ("integration",), ("browser",)} or (f[0] == "unit" and f[1] in packages)
               for f in folders), folders
