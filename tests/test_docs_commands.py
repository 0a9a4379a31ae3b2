"""The docs' promises, checked: every command they mark fast runs as written, and every relative link resolves.

A fenced block of README.md or docs/*.md whose info string is exactly `bash fast` is run as written with bash
(`set -e -o pipefail`), one test per block, named FILE:LINE. The blocks of one file run in order in one temporary
folder that stands in for the repository's root: links to its configs/ and examples/, and `.venv` linked to the
environment of the Python running the tests, so `.venv/bin/lopt ...` resolves; a later block reads what an earlier
one wrote, and nothing is written into the repository. Every other fenced block is documentation only; which
commands to mark fast is said in docs/architecture.md ("Docs").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FAST = "bash fast"
MIRRORED = ("configs", "examples")  # the repository folders the commands read by relative path
BLOCK_TIMEOUT_S = 900  # a hang, not a slow block: fast blocks take seconds to about a minute
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # the opening fence's line, from 1
    info: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def split_doc(doc: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file, and its other lines (the prose)."""
    blocks, prose, opening, body = [], [], None, []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if opening is None and line.startswith("```"):
            opening, body = (number, line[3:].strip()), []
        elif opening is not None and line.rstrip() == "```":
            blocks.append(Block(doc, opening[0], opening[1], "\n".join(body) + "\n"))
            opening = None
        elif opening is not None:
            body.append(line)
        else:
            prose.append(line)
    assert opening is None, f"{doc}:{opening[0]}: a fenced block is never closed"
    return blocks, prose


FAST_BLOCKS = [block for doc in DOCS for block in split_doc(doc)[0] if block.info == FAST]


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    """doc -> its temporary stand-in for the repository's root, made on first use and kept for its later blocks."""
    folders: dict[Path, Path] = {}

    def folder(doc: Path) -> Path:
        if doc not in folders:
            root = tmp_path_factory.mktemp(doc.stem)
            for name in MIRRORED:
                (root / name).symlink_to(REPO / name, target_is_directory=True)
            (root / ".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
            folders[doc] = root
        return folders[doc]

    return folder


def command_env() -> dict[str, str]:
    """The test's environment, with this Python's bin first on PATH, this checkout's lopt, and the hub off."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


@pytest.mark.integration
@pytest.mark.parametrize("block", FAST_BLOCKS, ids=[block.name for block in FAST_BLOCKS])
def test_a_fast_command_block_runs_as_written(block, folder_of):
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.text],
        cwd=folder_of(block.doc),
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert done.returncode == 0, (
        f"{block.name} exited with {done.returncode}:\n{block.text}\n"
        f"--- stdout (end)\n{done.stdout[-3000:]}\n--- stderr (end)\n{done.stderr[-3000:]}"
    )


def test_the_docs_mark_commands_fast_and_spell_bash_blocks_one_way():
    assert any(block.doc.name == "README.md" for block in FAST_BLOCKS), "README.md's everyday commands are run"
    odd = [
        f"{block.name}: ```{block.info}"
        for doc in DOCS
        for block in split_doc(doc)[0]
        if block.info.startswith("bash") and block.info not in ("bash", FAST)
    ]
    assert not odd, f"a bash block is ```bash or ```{FAST}; these are neither: {odd}"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen = set(), Counter()
    for line in split_doc(doc)[1]:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            found.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(REPO)) for doc in DOCS])
def test_every_relative_link_names_a_file_and_heading_that_exist(doc):
    prose = re.sub(r"`[^`]*`", "", "\n".join(split_doc(doc)[1]))  # code spans hold no links, only look-alikes
    broken = []
    for target in LINK.findall(prose):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {linked.name}")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)
