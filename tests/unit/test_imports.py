"""The import rule: which parts of r1lab may import which (the table in the design notes).

Every module under `src/r1lab` is parsed with `ast` (nothing is imported, so this is instant) and
each `import r1lab.X...` it contains, at any depth (inside functions too: a lazy import is still a
dependency), is checked against `ALLOWED`. Where today's code breaks the rule, the pair is listed in
`KNOWN_VIOLATIONS` and its test is a strict xfail: fixing the code turns it into a failure that asks
for the entry to be deleted, so the list can only shrink.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest

import r1lab
from r1lab.cli import COMMANDS

SRC = Path(r1lab.__file__).resolve().parent

# The architecture's boundary, from the design notes' layout table: part -> the parts it may import.
# A part is a top-level module or package of r1lab ("tasks" covers r1lab.tasks.*). Importing
# yourself is always fine. `config` holds R1labError and the shared config sections, so every part
# but `chat` may import it. The CLI layer (cli.py and the stage command modules it names in
# COMMANDS, which are cli.py split per stage) may import any stage; nothing imports `r1lab.cli`,
# and only the CLI layer imports a command module.
ALLOWED: dict[str, set[str]] = {
    "chat": set(),
    "config": set(),
    "dist": {"config"},
    "tasks": {"chat", "config"},
    "rewards": {"chat", "tasks", "config"},
    "modeling": {"config"},
    "rollout": {"modeling", "chat", "config"},
    "rl": {"tasks", "rewards", "rollout", "modeling", "metrics", "eval", "chat", "config"},
    "sft": {"tasks", "rewards", "rollout", "modeling", "metrics", "eval", "chat", "config"},
    "pretrain": {"tasks", "modeling", "metrics", "config"},
    "eval": {"tasks", "rewards", "rollout", "chat", "config"},
    "metrics": {"config"},
    "serve": {"rollout", "chat", "config"},
    "report": {"metrics", "config"},
}
# Orchestrators compose whole stages (the four-stage R1 pipeline, the distillation finding): like
# the command modules, they sit above the stages and may import any of them; no stage imports them.
ORCHESTRATORS = {"pipeline", "distill_finding"}  # parts (a package, or a top-level module)
COMMAND_MODULES = {module for module, _ in COMMANDS.values()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """`r1lab.tasks.arithmetic` -> `tasks`; `r1lab` itself -> `r1lab`."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "r1lab"


def is_part(name: str) -> bool:
    return (SRC / name).is_dir() or (SRC / f"{name}.py").is_file()


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Absolute names of the r1lab modules a file imports, with line numbers."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb from this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "r1lab":  # `from r1lab import tasks` names a part; `__version__` does not
                found += [(f"r1lab.{a.name}" if is_part(a.name) else target, node.lineno) for a in node.names]
            else:
                found.append((target, node.lineno))
    return [(m, line) for m, line in found if m == "r1lab" or m.startswith("r1lab.")]


@cache
def all_edges() -> list[tuple[str, str, int]]:
    """(importer module, imported module, line) for every r1lab import in the source tree."""
    return [
        (module_name(path), target, line)
        for path in sorted(SRC.rglob("*.py"))
        for target, line in imported_modules(path)
    ]


def is_entry(module: str) -> bool:
    """A command module or any module of an orchestrator: the layer above the stages."""
    return module in COMMAND_MODULES or part_of(module) in ORCHESTRATORS


def stage_edges() -> list[tuple[str, str, int]]:
    """Edges the table governs: imports from outside the CLI layer into another part."""
    return [
        (src, dst, line)
        for src, dst, line in all_edges()
        if src != "r1lab.cli" and not is_entry(src) and part_of(src) != part_of(dst)
    ]


def test_every_part_is_in_the_table():
    parts = {part_of(module_name(p)) for p in SRC.rglob("*.py")} - {"r1lab", "cli"}
    parts -= {part_of(m) for m in COMMAND_MODULES if m.count(".") == 1} | ORCHESTRATORS  # the layer above
    missing = parts - set(ALLOWED)
    assert not missing, f"new parts {sorted(missing)}: add their row to ALLOWED (and to the design notes)"


def test_the_parser_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "r1lab" / "rl"
    pkg.mkdir(parents=True)
    (tmp_path / "r1lab" / "chat.py").write_text("")
    (pkg / "x.py").write_text(
        "from . import losses\nfrom ..tasks import base\nfrom r1lab import chat, __version__\n"
        "def f():\n    import r1lab.metrics.run\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "r1lab")
    assert sorted(imported_modules(pkg / "x.py")) == [
        ("r1lab", 3),
        ("r1lab.chat", 3),
        ("r1lab.metrics.run", 5),
        ("r1lab.rl", 1),  # `from PACKAGE import name` is recorded as the package: same part either way
        ("r1lab.tasks", 2),
    ]


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_part_imports_only_what_the_table_allows(part):
    bad = [
        f"{src} -> {dst} (line {line})"
        for src, dst, line in stage_edges()
        if part_of(src) == part and part_of(dst) not in ALLOWED[part]
    ]
    assert not bad, f"{part} may import only {sorted(ALLOWED[part])}: " + "; ".join(bad)


def test_nothing_imports_the_cli():
    users = [f"{src} (line {line})" for src, dst, line in all_edges() if dst == "r1lab.cli"]
    assert not users


def test_only_the_cli_layer_imports_command_modules():
    users = [
        f"{src} -> {dst} (line {line})"
        for src, dst, line in all_edges()
        if is_entry(dst) and not is_entry(src) and src != "r1lab.cli"
    ]
    assert not users


def modules_loaded_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted(sys.modules)))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_tasks_and_rewards_do_not_import_torch():
    loaded = modules_loaded_after("import r1lab.tasks, r1lab.rewards, r1lab.chat, r1lab.config")
    assert "r1lab.rewards" in loaded and "torch" not in loaded


def test_top_level_help_does_not_import_torch():
    loaded = modules_loaded_after(
        """
        import contextlib, io
        from r1lab.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["--help"]) == 0
        """
    )
    assert "torch" not in loaded
