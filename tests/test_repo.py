"""Repository hygiene: lint, formatting, the README's commands and CI agree."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(
        r"```(?:sh|bash|console)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S
    )
    return [b.strip() for b in blocks]


def test_readme_starts_with_run_and_test_commands():
    first, second = readme_commands()[:2]
    assert "loradock serve" in first
    assert "pytest" in second


def test_ci_runs_exactly_the_readme_test_command():
    test_command = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def assert_tool_passes(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint_and_format_are_clean():
    assert_tool_passes("ruff", "check", ".")
    assert_tool_passes("ruff", "format", "--check", ".")


def test_mypy_is_clean_on_the_packages():
    assert_tool_passes("mypy", "adapters", "service", "clients/python/loradock_client")


def test_every_package_directory_is_installed():
    """pyproject lists packages by hand (the layout maps service/ -> loradock.service)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    for top in ("service", "adapters"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).as_posix().replace("/", ".")
            assert f'"loradock.{rel}"' in pyproject, f"loradock.{rel} missing from pyproject.toml"
