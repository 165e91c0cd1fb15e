"""The README and docs/ stay true to the code: a short front page, links that resolve, and
commands the CLI accepts.

- README.md has at most MAX_README_LINES lines; the detail lives in docs/.
- Every relative Markdown link in README.md and docs/*.md names an existing file, and a `#anchor`
  names a heading of that file (GitHub's heading slugs).
- Every `rsrefseg ...` command in a shell code block (fence info bash, sh, shell, console, or
  none) parses with the CLI's own parser; for `rsrefseg submit ... -- JOB ARGS` the job after
  `--` parses as a command of its own. `\\` continuations, a leading `$ `, `VAR=value` prefixes,
  `&&`/`||`/`;`/`|` chains and trailing comments are handled as a shell would.
- Every ```python block compiles.

A failure names the file, the line and what is wrong. No Ray, no torch: the parser is the CLI's.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from rsrefseg.cli import build_parser
from rsrefseg.jobs.submit import SUBMITTABLE

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 300
SHELL_FENCES = {"", "bash", "sh", "shell", "zsh", "console", "shell-session"}
CHAIN = re.compile(r"^[&;|]+$")  # a token that separates commands: && || ; | &
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def label(page: Path) -> str:
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else str(page)


# --- Markdown structure -----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: its info word (language), and its lines with their 1-based numbers."""

    info: str
    lines: tuple[tuple[int, str], ...]


def split_fences(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced code blocks of a Markdown text, and its other lines (numbered from 1)."""
    blocks, prose = [], []
    fence, info, body = None, "", []
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, info, body = match.group(1), match.group(2).lower(), []
            else:
                prose.append((number, line))
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not line.strip().strip(fence[0]):
            blocks.append(Block(info, tuple(body)))
            fence = None
        else:
            body.append((number, line))
    if fence is not None:  # an unclosed fence runs to the end, as Markdown reads it
        blocks.append(Block(info, tuple(body)))
    return blocks, prose


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in split_fences(text)[1]:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and link reference outside code."""
    out = []
    for number, line in split_fences(text)[1]:
        line = INLINE_CODE.sub("", line)
        out += [(number, m.group(1)) for m in LINK.finditer(line)]
        out += [(number, m.group(1)) for m in REFERENCE.finditer(line)]
    return out


def link_problems(page: Path, text: str | None = None) -> list[str]:
    """What is wrong with the relative links of a page: a missing file or a missing heading."""
    text = page.read_text() if text is None else text
    problems = []
    for number, target in links(text):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto, s3: not a file of this repository
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if path.startswith("/"):
            problems.append(f"{label(page)}:{number}: {target}: an absolute path; link relative to the page")
        elif not file.exists():
            problems.append(f"{label(page)}:{number}: {target}: no such file ({file})")
        elif anchor and file.suffix == ".md" and anchor.lower() not in anchors(file.read_text()):
            problems.append(f"{label(page)}:{number}: {target}: no heading #{anchor} in {label(file)}")
    return problems


# --- commands in code blocks ------------------------------------------------------------------


def command_lines(block: Block) -> list[tuple[int, str]]:
    """The shell lines of a block, `\\` continuations joined, each with the line it starts on. In a
    console block only `$ ` lines are commands (the rest is their output)."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in block.lines:
        if pending is None:
            stripped = line.strip()
            if block.info in ("console", "shell-session"):
                if not stripped.startswith("$ "):
                    continue
            if stripped.startswith("$ "):
                stripped = stripped[2:]
            pending = (number, stripped)
        else:
            pending = (pending[0], pending[1] + " " + line.strip())
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
        else:
            out.append(pending)
            pending = None
    if pending is not None:
        out.append(pending)
    return out


def invocations(line: str) -> list[list[str]]:
    """The argument lists of every `rsrefseg` (or `python -m rsrefseg`) command on a shell line.

    Raises ValueError when the line does not tokenize (an unclosed quote)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&;|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments: list[list[str]] = [[]]
    for token in lexer:
        if CHAIN.match(token):
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for words in segments:
        while words and ASSIGNMENT.match(words[0]):
            words = words[1:]  # FOO=bar rsrefseg ...
        if words and Path(words[0]).name == "rsrefseg":
            found.append(words[1:])
            continue
        for i in range(len(words) - 2):  # e.g. `ray job submit ... -- python -m rsrefseg train ...`
            if PYTHON.match(Path(words[i]).name) and words[i + 1:i + 3] == ["-m", "rsrefseg"]:
                found.append(words[i + 3:])
                break
    return found


def parse_error(argv: list[str]) -> str | None:
    """None when the CLI's parser accepts `rsrefseg ARGV` (and the job of a submit), else why not."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            return None
        lines = err.getvalue().strip().splitlines()
        return lines[-1] if lines else f"exit {exc.code}"
    if args.command != "submit":
        return None
    job = list(args.job)
    if job[:1] == ["--"]:
        job = job[1:]
    if not job or job[0] not in SUBMITTABLE:
        return f"submit: name the job after --, one of {', '.join(SUBMITTABLE)}"
    inner = parse_error(job)
    return f"the submitted job `{shlex.join(job)}`: {inner}" if inner else None


def command_problems(page: Path, text: str | None = None) -> list[str]:
    """Every `rsrefseg` command of the page's shell blocks that the CLI would refuse."""
    text = page.read_text() if text is None else text
    problems = []
    for block in split_fences(text)[0]:
        if block.info not in SHELL_FENCES:
            continue
        for number, line in command_lines(block):
            try:
                commands = invocations(line)
            except ValueError as exc:
                problems.append(f"{label(page)}:{number}: does not tokenize ({exc}): {line}")
                continue
            for argv in commands:
                error = parse_error(argv)
                if error:
                    problems.append(f"{label(page)}:{number}: rsrefseg {shlex.join(argv)}\n    {error}")
    return problems


def python_problems(page: Path, text: str | None = None) -> list[str]:
    text = page.read_text() if text is None else text
    problems = []
    for block in split_fences(text)[0]:
        if block.info not in ("python", "py") or not block.lines:
            continue
        source = "\n".join(line for _, line in block.lines)
        try:
            ast.parse(source)
        except SyntaxError as exc:
            problems.append(f"{label(page)}:{block.lines[0][0] + (exc.lineno or 1) - 1}: {exc.msg}")
    return problems


# --- the tests --------------------------------------------------------------------------------


def test_readme_is_a_front_page():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (f"README.md has {lines} lines (at most {MAX_README_LINES}): "
                                       "move detail into docs/ and link it")


def test_docs_exist_and_the_readme_links_each():
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for _, target in links(README.read_text()) if not SCHEME.match(target)}
    docs = sorted(DOCS.glob("*.md"))
    assert docs, "docs/ has no pages"
    unlinked = [label(p) for p in docs if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", pages(), ids=label)
def test_links_resolve(page):
    problems = link_problems(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=label)
def test_commands_parse(page):
    problems = command_problems(page)
    assert not problems, "commands the CLI refuses:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", pages(), ids=label)
def test_python_blocks_compile(page):
    problems = python_problems(page)
    assert not problems, "python blocks that do not compile:\n" + "\n".join(problems)


def test_the_checks_catch_mistakes(tmp_path):
    """The checks themselves: made-up pages with one mistake each are reported, the right
    forms of every shell construct they handle are not."""
    good = tmp_path / "good.md"
    good.write_text(
        "# Title\n\n## Object storage (s3://)\n\nSee [here](#object-storage-s3), [me](good.md#title),\n"
        "[web](https://example.org/x) and `[code](nowhere.md)`.\n\n"
        "```bash\n"
        "$ rsrefseg train --config configs/demo.yaml train.epochs=1   # a comment\n"
        "RAY_ADDRESS=http://127.0.0.1:8265 rsrefseg jobs list && echo done | cat\n"
        "rsrefseg predict --checkpoint runs/<run>/best --image a.png --text \"the red car\" \\\n"
        "    --out mask.png; rsrefseg ui\n"
        "rsrefseg submit --address http://127.0.0.1:8265 -- train --config configs/demo.yaml k=v\n"
        "ray job submit --working-dir . -- python -m rsrefseg evaluate --checkpoint runs/r\n"
        "```\n\n"
        "```python\nimport rsrefseg\n```\n")
    assert link_problems(good) == []
    assert command_problems(good) == []
    assert python_problems(good) == []
    assert [len(invocations(line)) for _, line in command_lines(split_fences(good.read_text())[0][0])] \
        == [1, 1, 2, 1, 1]

    bad = tmp_path / "bad.md"
    bad.write_text(
        "# Title\n[gone](missing.md) [anchor](good.md#no-such-heading) [self](#title)\n\n"
        "```\n"
        "rsrefseg train --no-such-flag\n"
        "FOO=1 rsrefseg no-such-command\n"
        "echo hi && rsrefseg evaluate \\\n"
        "    --split test\n"
        "rsrefseg submit --address http://x -- train --no-such-flag\n"
        "rsrefseg submit --address http://x -- ui\n"
        "python -m rsrefseg prepare --format nope --root a --out b\n"
        "rsrefseg train --text \"unclosed\n"
        "```\n\n"
        "```console\n$ rsrefseg tune --bad\nrsrefseg train: config error: output, not a command\n```\n\n"
        "```python\ndef broken(:\n```\n")
    problems = link_problems(bad)
    assert len(problems) == 2 and "bad.md:2: missing.md" in problems[0], problems
    assert "no heading #no-such-heading" in problems[1], problems
    problems = command_problems(bad)
    lines = [p.split(":")[1] for p in problems]
    assert lines == ["5", "6", "7", "9", "10", "11", "12", "16"], problems
    assert "--no-such-flag" in problems[0] and "unrecognized arguments" in problems[0]
    assert "--checkpoint" in problems[2]  # evaluate's required option, across the continuation
    assert "the submitted job `train --no-such-flag`" in problems[3]
    assert python_problems(bad) and python_problems(bad)[0].startswith(f"{bad}:21:")
