"""The README is the front door and docs/ holds the rest: their commands, links, nav and examples.

The MkDocs strict build itself runs in README command 2 (and so in `.ci/run`), not here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tao_core.config import load_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 150
COMMAND_1 = "bash scripts/setup.sh && .venv/bin/tao demo"
COMMAND_2 = ("bash scripts/setup.sh && .venv/bin/ruff check . && .venv/bin/python -m pytest"
             " && .venv/bin/mkdocs build --strict --site-dir /tmp/tao-site")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def code_blocks(text: str, lang: str) -> list[str]:
    return [body for tag, body in FENCE.findall(text) if tag == lang]


def prose(text: str) -> str:
    """The text with fenced code blocks and inline code removed: links inside them are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def test_readme_is_short_and_has_the_two_commands():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    first = code_blocks(text, "bash")[0].splitlines()
    assert first == [COMMAND_1, COMMAND_2], f"README's first code block must be the two commands, got {first}"


def test_ci_runs_readme_command_2_exactly():
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert commands == [COMMAND_2], f".ci/run must run README command 2 and nothing else, runs {commands}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_relative_links_point_at_existing_files(page: Path):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).is_file():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links to missing files: {broken}"


def test_mkdocs_nav_lists_every_page_once():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = [next(iter(item.values())) for item in config["nav"]]
    on_disk = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == on_disk, f"mkdocs.yml nav {sorted(nav)} != docs/*.md {on_disk}"


def test_readme_config_is_a_valid_run_config(tmp_path: Path):
    toml = code_blocks(README.read_text(), "toml")[0]
    (tmp_path / "run.toml").write_text(toml)
    cfg = load_config(tmp_path / "run.toml")
    assert cfg.task == "arithmetic"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_python_examples_compile(page: Path):
    for i, block in enumerate(code_blocks(page.read_text(), "python")):
        compile(block, f"{page.name} python block {i + 1}", "exec")
