"""The README and docs/ stay true: size, links, and every `wsi-mil ...` example against the real parser.

- README.md is a front door: at most 16 KB, and it links every page in docs/.
- Every relative link in README.md and docs/*.md resolves to a file or folder of the checkout;
  a `#anchor` into a Markdown page names one of its headings.
- Every `wsi-mil ...` command shown in a fenced code block (or an inline code span that is a
  whole command) parses with `wsi_mil.cli.build_parser()`. A synopsis line (`[--opt X]`,
  `a|b`, `...`, `<placeholder>`) cannot be parsed as it stands: its sub-command, every flag it
  names and every value it lists for a flag with fixed choices are checked instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 16 * 1024

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
FENCE = re.compile(r"^\s*(```|~~~)")
COMMAND_START = re.compile(r"^(?:\./)?(?:\.venv/bin/)?wsi-mil(?:\s|$)")
SYNOPSIS_MARK = re.compile(r"\[|\]|\||\.\.\.|…|<[^>]*>")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------- Markdown reading


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fence = [], None
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
            continue
        if fence is None:
            out.append((no, line))
    return out


def code_block_lines(path: Path) -> list[tuple[int, str]]:
    """(line number of its first line, logical line) inside fenced code blocks, backslash continuations joined."""
    out: list[tuple[int, str]] = []
    fence, pending, start = None, "", 0
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if m and (fence is None or fence == m.group(1)):
            if pending:
                out.append((start, pending))
                pending = ""
            fence = None if fence else m.group(1)
            continue
        if fence is None:
            continue
        if not pending:
            start = no
        stripped = line.strip() if pending else line.rstrip()
        if stripped.endswith("\\") and not stripped.endswith("\\\\"):
            pending += stripped[:-1].rstrip() + " "
        else:
            out.append((start, pending + stripped))
            pending = ""
    return out


def heading_slugs(path: Path) -> set[str]:
    """GitHub's anchors for a page's headings (lower case, punctuation dropped, spaces to hyphens, -1 for repeats)."""
    slugs: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def relative_links(path: Path) -> list[tuple[int, str]]:
    out = []
    for no, line in prose_lines(path):
        # a link's text may hold code (`[`x.md`](x.md)`); code elsewhere never holds a link
        line = CODE_SPAN.sub(lambda m: "code", line)
        for target in LINK.findall(line):
            if re.match(r"^(?:[a-z][a-z0-9+.-]*:|//)", target, re.IGNORECASE):
                continue  # http:, https:, mailto: ...
            out.append((no, target))
    return out


# --------------------------------------------------------------------------- commands


def strip_comment(line: str) -> str:
    """The line up to an unquoted `#` that starts a word (bash's rule)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def split_commands(line: str) -> list[str]:
    """The `wsi-mil` commands of one shell line (`a && wsi-mil ...` counts; `$ ` prompts dropped)."""
    line = strip_comment(line.strip())
    line = line.removeprefix("$ ")
    return [part.strip() for part in re.split(r"\s*(?:&&|\|\||;)\s*", line) if COMMAND_START.match(part.strip())]


@dataclass
class Example:
    where: str
    command: str


def examples() -> list[Example]:
    found = []
    for path in doc_files():
        for no, line in code_block_lines(path):
            for cmd in split_commands(line):
                found.append(Example(f"{rel(path)}:{no}", cmd))
        for no, line in prose_lines(path):
            for m in CODE_SPAN.finditer(line):
                span = m.group(2).strip()
                if COMMAND_START.match(span) and len(span.split()) > 2:
                    for cmd in split_commands(span):
                        found.append(Example(f"{rel(path)}:{no}", cmd))
    return found


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert actions, "wsi-mil's parser has no sub-commands"
    return dict(actions[0].choices)


def _settings(command: str) -> type | None:
    """The settings dataclass of a sub-command (its flags' types and choices are checked there)."""
    from wsi_mil.cli import VERBS

    verb = next((v for v in VERBS if command == v.NAME), None)
    return verb.SETTINGS[0] if verb is not None and getattr(verb, "SETTINGS", None) else None


def parse_error(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The parser's complaint, or the settings' (a value outside a flag's choices, a bad number):
    what the command would say before doing anything."""
    from wsi_mil.cli.common import config_overrides
    from wsi_mil.config import build_config
    from wsi_mil.errors import ConfigError

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):  # --help / --version exit 0
            lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
            return lines[-1] if lines else f"exit {exc.code}"
        return None
    cls = _settings(args.command)
    if cls is not None:
        try:
            build_config(cls, overrides=config_overrides(args, cls))
        except ConfigError as exc:
            return str(exc)
    return None


def _choices(command: str, action: argparse.Action) -> Any:
    """A flag's fixed choices: argparse's, or those of its settings field."""
    if action.choices:
        return action.choices
    cls = _settings(command)
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
    f = fields.get(action.dest)
    return f.metadata.get("choices") if f is not None else None


def synopsis_error(subs: dict[str, argparse.ArgumentParser], argv: list[str]) -> str | None:
    """A synopsis: its sub-command, every flag it names and every listed value of a flag with choices."""
    if not argv or argv[0] not in subs:
        return f"unknown sub-command {argv[0] if argv else '(none)'!r}"
    sub = subs[argv[0]]
    problems = []
    tokens = [t.strip("[](){},") for t in argv[1:]]
    for i, tok in enumerate(tokens):
        if not tok.startswith("-") or tok in ("-", "--") or re.match(r"^-\d", tok):
            continue
        flag = tok.split("=", 1)[0]
        action = sub._option_string_actions.get(flag)
        if action is None:
            problems.append(f"unrecognized option {flag}")
            continue
        value = tok.split("=", 1)[1] if "=" in tok else (tokens[i + 1] if i + 1 < len(tokens) else "")
        allowed = _choices(argv[0], action)
        if allowed and value and not value.startswith("-") and not re.search(r"[A-Z<>]|\.\.\.", value):
            for choice in value.split("|"):
                if choice and choice not in allowed:
                    problems.append(f"{flag}: invalid choice {choice!r} (choose from {', '.join(map(str, allowed))})")
    return "; ".join(problems) or None


def check_examples(found: list[Example]) -> tuple[list[str], int, int]:
    """(failures as 'file:line: command -> error', commands parsed, synopses checked flag by flag)."""
    from wsi_mil.cli import build_parser

    parser = build_parser()
    subs = subparsers(parser)
    failures, parsed, synopses = [], 0, 0
    for ex in found:
        try:
            argv = shlex.split(ex.command)[1:]
        except ValueError as exc:
            failures.append(f"{ex.where}: {ex.command}\n    -> cannot be split like a shell line: {exc}")
            continue
        if SYNOPSIS_MARK.search(ex.command):
            synopses += 1
            err = synopsis_error(subs, argv)
        else:
            parsed += 1
            err = parse_error(parser, argv)
        if err:
            failures.append(f"{ex.where}: {ex.command}\n    -> {err}")
    return failures, parsed, synopses


# --------------------------------------------------------------------------- tests


def test_readme_is_a_front_door() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes, over {README_MAX_BYTES:,}: move detail into docs/"


def test_readme_links_every_docs_page() -> None:
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no pages"
    linked = {(README.parent / t.split("#", 1)[0]).resolve() for _, t in relative_links(README) if t.split("#", 1)[0]}
    missing = [rel(p) for p in pages if p.resolve() not in linked]
    assert not missing, f"README.md does not link these docs pages: {', '.join(missing)}"


def test_readme_keeps_the_ci_test_command() -> None:
    """.ci/run runs the first non-fence line within three lines after the TEST-COMMAND marker."""
    lines = README.read_text(encoding="utf-8").splitlines()
    marker = [i for i, line in enumerate(lines) if "TEST-COMMAND" in line]
    assert marker, "README.md lost the TEST-COMMAND marker that .ci/run reads"
    after = [ln for ln in lines[marker[0] + 1 : marker[0] + 4] if "TEST-COMMAND" not in ln and not ln.startswith("```")]
    assert after and "pytest" in after[0], f"the line after TEST-COMMAND is not the test command: {after[:1]}"


def test_relative_links_resolve() -> None:
    broken = []
    for path in doc_files():
        for no, target in relative_links(path):
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{rel(path)}:{no}: {target} (no such file or folder)")
            elif anchor and dest.suffix == ".md" and anchor not in heading_slugs(dest):
                broken.append(f"{rel(path)}:{no}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_documented_command_parses() -> None:
    found = examples()
    failures, parsed, synopses = check_examples(found)
    print(f"\n{len(found)} wsi-mil commands in README.md and docs/: {parsed} parsed, {synopses} synopses checked flag by flag")
    assert not failures, f"{len(failures)} documented command(s) do not match the parser:\n" + "\n".join(failures)
    # the extraction itself must keep working: the README alone shows a dozen real commands
    assert parsed >= 15, f"only {parsed} commands parsed: is the code-block reading broken?"


def test_a_bogus_flag_is_caught(tmp_path: Path) -> None:
    """The checks fail on a doc that shows a flag that does not exist, in a command and in a synopsis."""
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "wsi-mil tile slides/ --out tiles \\\n    --no-such-flag 3   # a comment\n"
        "wsi-mil heatmap RUN [--normalise rank|bogus] [--formats png]\n"
        "wsi-mil tile slides/ --out tiles --mpp 0.5\n"
        "wsi-mil train-mil m.csv --features f --out r --model abmill\n"
        "```\n",
        encoding="utf-8",
    )
    found = [Example(f"page.md:{no}", cmd) for no, line in code_block_lines(page) for cmd in split_commands(line)]
    failures, parsed, synopses = check_examples(found)
    assert (parsed, synopses) == (3, 1)
    assert len(failures) == 3, failures
    assert failures[0].startswith("page.md:2:") and "--no-such-flag" in failures[0]
    assert failures[1].startswith("page.md:4:") and "bogus" in failures[1]
    assert failures[2].startswith("page.md:6:") and "'abmill': invalid choice" in failures[2]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("$ wsi-mil review run   # then open http://127.0.0.1:8765/", ["wsi-mil review run"]),
        ("bash setup.sh && .venv/bin/wsi-mil demo --out d", [".venv/bin/wsi-mil demo --out d"]),
        ("python -m wsi_mil.cli tile x --out y", []),
        ("wsi-mil synth --out 'a # b'", ["wsi-mil synth --out 'a # b'"]),
    ],
)
def test_command_lines_are_read_like_a_shell(line: str, expected: list[str]) -> None:
    assert split_commands(line) == expected
