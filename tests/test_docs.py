"""The documentation cannot rot: every ``segpipe`` command line shown in the README and docs/ parses with the real
command's options (a renamed or removed option fails here), and the site builds strictly (in CI: .ci/run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from segpipe.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_lines(markdown: str) -> list[str]:
    """The lines of a Markdown text's code: fenced blocks and 4-space indented blocks, continuations joined."""
    lines, fenced, joined = [], False, ""
    for raw in markdown.splitlines():
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or raw.startswith("    ")):
            continue
        line = raw.strip()
        if joined:
            line = joined + " " + line
        if line.endswith("\\"):
            joined = line[:-1].strip()
            continue
        joined = ""
        lines.append(line)
    return lines


def segpipe_commands(markdown: str) -> list[str]:
    """Example ``segpipe`` command lines (not synopses: a line with ``[``, ``|`` or ``...`` shows syntax)."""
    found = []
    for line in code_lines(markdown):
        line = re.sub(r"^(\$ |\.venv/bin/)", "", line)
        if not line.startswith("segpipe ") or any(mark in line for mark in ("[", "|", "...", "…", "<", "{")):
            continue
        command = line.split("  #")[0].split(" # ")[0]
        command = re.split(r" (?:>>?|2>|&&|;|\|\|) ", command)[0]  # the shell's redirections and lists are not argv
        found.append(command.strip())
    return found


EXAMPLES = [(page.relative_to(ROOT).as_posix(), cmd) for page in PAGES for cmd in segpipe_commands(page.read_text())]


def test_the_docs_show_commands() -> None:
    assert len(EXAMPLES) >= 12
    assert {page for page, _ in EXAMPLES} >= {"README.md", "docs/slides.md", "docs/nightly.md"}


@pytest.mark.parametrize(("page", "command"), EXAMPLES, ids=[f"{p}:{k}" for k, (p, _) in enumerate(EXAMPLES)])
def test_every_command_line_in_the_docs_parses(page: str, command: str) -> None:
    argv = shlex.split(command.replace("$(", "").replace(")", ""))[1:]
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page}: `{command}` does not parse (exit {exc.code})")
