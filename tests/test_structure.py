"""The house rules of the layout: evaluation, generation and run loading never import a trainer."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINERS = ("slit.train.stage1", "slit.train.stage2")
NO_TRAINER_IMPORTS = ("slit/eval", "slit/generate", "slit/runs.py")


def imported_modules(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, module) of every import in `source` (a module of `package`, e.g. ("slit", "eval")), at any
    depth (inside functions too); `from a import b` gives both `a` and `a.b` (b may be a module)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                parent = package[: len(package) - node.level + 1]
                base = ".".join(parent + ((node.module,) if node.module else ()))
            else:
                base = node.module or ""
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def is_trainer(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TRAINERS)


def test_eval_generate_and_runs_import_no_trainer():
    files = []
    for place in NO_TRAINER_IMPORTS:
        path = ROOT / place
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    assert len(files) > 5, files
    offending = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in files
        for line, module in imported_modules(path.read_text(), path.relative_to(ROOT).parent.parts)
        if is_trainer(module)
    ]
    assert not offending, "\n".join(offending)


def test_the_check_sees_every_form_of_import():
    source = (
        "import os\n"
        "def f():\n"
        "    from slit.train import stage2\n"
        "    import slit.train.stage1 as s\n"
        "    from ..train.stage1 import train\n"
    )
    found = [m for _, m in imported_modules(source, ("slit", "eval")) if is_trainer(m)]
    assert found == ["slit.train.stage2", "slit.train.stage1", "slit.train.stage1", "slit.train.stage1.train"]
    assert not is_trainer("slit.train.stage1_model") and not is_trainer("slit.eval.stage1")
