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
    assert commands[1] == 'pip install -e ".[test]" && python -m pytest -q -n 2'
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == commands[1]


def test_readme_python_examples_run():
    blocks = code_blocks("python")
    assert blocks
    namespaces = []
    for block in blocks:
        namespaces.append({})
        exec(compile(block, "README.md", "exec"), namespaces[-1])
    assert namespaces[0]["y"].shape == (4, 64)


def test_readme_module_table_matches_the_tree():
    """Every module of the package has a row, and every path in the table exists."""
    table = README.split("## What is here", 1)[1].split("\n\n", 2)[1]
    listed = set(re.findall(r"`(bitnet_jax/[\w/]+\.(?:py|cc))`", table))
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "bitnet_jax").rglob("*")
               if p.suffix in (".py", ".cc") and p.name != "__init__.py"}
    assert sorted(on_disk - listed) == [], "modules missing from README's table"
    assert sorted(listed - on_disk) == [], "README's table names files that do not exist"
