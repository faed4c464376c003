"""The commands and links of the README and docs/ work as written.

Every command line in a fenced block (but Python's) is checked: ``coom``
commands, also under ``torchrun``, must parse, and their recipe with its
``--set`` overrides must load; ``make`` targets must exist. Lines that
spell a synopsis (with placeholders such as RUN_DIR or KEY=VALUE) are
left out. ``coom model info`` runs, and where the block after it shows
output, prints exactly that; so does a command whose next block shows a
``coom: error:`` line. Relative links must name files of the
repository.
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from coom.cli import build_parser
from coom.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COOM = re.compile(r"^(?:\.venv/bin/)?(?:coom|python3? -m coom) ")
TORCHRUN = re.compile(r"^(?:\.venv/bin/)?torchrun .*?-m coom ")
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b|\[[A-Z]")


def _blocks(page: Path) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced block of page."""
    blocks, language, lines = [], None, []
    for line in page.read_text(encoding="utf-8").splitlines():
        fence = re.match(r"^```(\w*)", line)
        if fence and language is None:
            language, lines = fence.group(1), []
        elif fence:
            blocks.append((language, lines))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def _commands(lines: list[str]) -> list[str]:
    """The block's lines with continuations joined and comments cut."""
    commands, pending = [], ""
    for line in lines:
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        commands.append(re.sub(r"\s+#.*$", "", pending).strip())
        pending = ""
    return commands


def _examples() -> list[tuple[str, str, list[str]]]:
    """(where, command, output block after it or []) of every page."""
    found = []
    for page in PAGES:
        blocks = _blocks(page)
        for index, (language, lines) in enumerate(blocks):
            if language == "python":
                continue
            after = blocks[index + 1][1] if index + 1 < len(blocks) else []
            for command in _commands(lines):
                if (COOM.match(command) or TORCHRUN.match(command)
                        or command.startswith("make ")) \
                        and not PLACEHOLDER.search(command):
                    found.append((page.name, command, after))
    return found


EXAMPLES = _examples()


def test_the_pages_hold_commands():
    assert len(EXAMPLES) > 20
    assert any(command.startswith("make test") for _, command, _ in EXAMPLES)


@pytest.mark.parametrize("where, command, output", EXAMPLES,
                         ids=[f"{where}: {command[:60]}"
                              for where, command, _ in EXAMPLES])
def test_command_works_as_written(where, command, output):
    if command.startswith("make "):
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(),
                             re.MULTILINE)
        assert shlex.split(command)[1] in targets
        return
    words = shlex.split(re.sub(r"^.*?-m coom |^\S*coom ", "", command))
    if output and output[0].startswith("coom: error: "):
        failed = subprocess.run([sys.executable, "-m", "coom", *words],
                                capture_output=True, text=True)
        assert failed.returncode == 2
        assert failed.stderr.splitlines() == output
        return
    args = build_parser().parse_args(words)
    if TORCHRUN.match(command) and args.command == "train":
        assert args.run_dir or args.resume, "torchrun needs --run-dir"
    recipe = getattr(args, "recipe", None)
    if hasattr(args, "overrides") and not getattr(args, "resume", None) \
            and (recipe is None or not recipe.endswith(".yaml")):
        load_config(recipe or "tiny", args.overrides)
    if args.command == "model":
        shown = subprocess.run(
            [sys.executable, "-m", "coom", *words], capture_output=True,
            text=True, check=True).stdout.splitlines()
        if output and output[0] == shown[0]:
            assert shown == output


def test_relative_links_name_files_of_the_repository():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), \
                f"{page.name}: link to {target}"
