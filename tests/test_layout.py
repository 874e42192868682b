"""DESIGN §1's one-way data flow, read from the source (every import, lazy ones inside functions included)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pnsfw"
STAGES = ("store", "indexer", "classifier", "search", "api", "distributed", "cli")
# stage -> stages it must never import
FORBIDDEN = {
    "store": {"indexer", "classifier", "search", "api", "distributed", "cli"},
    "search": {"classifier", "indexer", "api", "distributed", "cli"},
    "indexer": {"classifier", "search", "api", "distributed", "cli"},
    "classifier": {"indexer", "search", "api", "distributed", "cli"},  # handed embedders by cli, like search
    "distributed": {"api", "cli"},
    "api": {"cli"},
}


def _module(path: Path, root: Path = PACKAGE) -> list[str]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """Absolute names of every pnsfw module PATH imports, anywhere in the file."""
    here, found = _module(path, root), set()
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pnsfw"}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + (node.module.split(".") if node.module else []))
            if name.split(".")[0] == "pnsfw":
                found |= {name} | {f"{name}.{a.name}" for a in node.names}
    return found


def stage_of(name: str) -> "str | None":
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def violations(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        stage = stage_of(".".join(_module(path, root)))
        for name in sorted(imports_of(path, root)):
            if stage_of(name) in FORBIDDEN.get(stage or "", set()):
                bad.append(f"{path.relative_to(root.parent)} ({stage}) imports {name}")
    return bad


def test_data_flows_one_way() -> None:
    assert violations() == []


def test_the_checker_sees_relative_and_lazy_imports(tmp_path: Path) -> None:
    names = imports_of(PACKAGE / "search" / "query.py")
    assert "pnsfw.store.Store" in names and "pnsfw.errors" in names  # `from ..store import Store` resolved
    root = tmp_path / "pnsfw"
    (root / "search").mkdir(parents=True)
    probe = root / "search" / "probe.py"
    probe.write_text("def f():\n    from ..classifier.model import load_classifier\n    import pnsfw.indexer.encoder\n")
    assert {"pnsfw.classifier.model", "pnsfw.indexer.encoder"} <= imports_of(probe, root)
    assert violations(root) == ["pnsfw/search/probe.py (search) imports pnsfw.classifier.model",
                                "pnsfw/search/probe.py (search) imports pnsfw.classifier.model.load_classifier",
                                "pnsfw/search/probe.py (search) imports pnsfw.indexer.encoder"]
