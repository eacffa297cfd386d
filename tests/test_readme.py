"""README stays true: CI runs its test command, its Python example runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    commands = [block.strip() for block in code_blocks("bash")[:2]]
    assert commands[0].startswith("pip install -e . && bitnet ")
    assert commands[1] == 'pip install -e ".[test]" && python -m pytest -q'
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == commands[1]


def test_readme_python_examples_run():
    blocks = code_blocks("python")
    assert blocks
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (4, 64)
