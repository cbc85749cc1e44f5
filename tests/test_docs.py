"""The documentation stays true to the tree and to the code.

- Every relative link in README.md, docs/*.md and bench/README.md names a
  file that exists, and every `#anchor` names a heading of its target, by
  GitHub's slug rules.
- The README's configuration table lists every `EMBEDSTREAM_*` variable the
  code reads (each `Settings` field, and any other name a source file
  spells out), and no variable the code does not read.
- README.md stays short: the reference lives in docs/.

No network, no Redis: these only read files.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PACKAGES = ("pipeline", "workers", "mcp_server", "embedstream")
README_MAX_LINES = 350

# Variables the source spells out that only the test suite sets, so users
# never need them; none today. Add a name here only with the reason beside it.
TEST_ONLY_VARIABLES: frozenset[str] = frozenset()

VARIABLE = re.compile(r"EMBEDSTREAM_[A-Z0-9_]+")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, …


def doc_files() -> list[Path]:
    """The Markdown files a user reads: the README, docs/ and the benchmarks' README."""
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a shell comment there is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor: lowercase, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of a Markdown file (repeats get -1, -2, …)."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """Every link target in a Markdown file's prose (inline, image and reference links)."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            targets.append(definition.group(1))
            continue
        targets += INLINE_LINK.findall(CODE_SPAN.sub("", line))
    return targets


def broken_link(source: Path, target: str) -> str | None:
    """Why a link of `source` does not resolve, or None when it does (or is external)."""
    if EXTERNAL.match(target):
        return None
    location, _, anchor = target.partition("#")
    destination = (source.parent / location).resolve() if location else source
    if not destination.exists():
        return f"{target}: no file {destination.relative_to(ROOT)}"
    if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
        return f"{target}: no heading with the anchor #{anchor} in {destination.name}"
    return None


def variables_in_source() -> set[str]:
    """`EMBEDSTREAM_*` names spelled in string literals of the packages' source files."""
    names: set[str] = set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names.update(VARIABLE.findall(node.value))
    return names


def settings_variables() -> set[str]:
    """The variable of each `Settings` field, named the way `Settings.from_env` names it."""
    try:
        from pipeline import Settings
    except ImportError:
        from pipeline.settings import Settings
    try:
        from pipeline import PREFIX
    except ImportError:
        from pipeline.settings import PREFIX
    return {PREFIX + field.name.upper() for field in dataclasses.fields(Settings)}


def configuration_table() -> set[str]:
    """The variables named in the first cell of the README's configuration rows."""
    names: set[str] = set()
    for line in prose_lines(README.read_text(encoding="utf-8")):
        if re.match(r"^\|\s*`EMBEDSTREAM_", line):
            names.update(re.findall(r"`(EMBEDSTREAM_[A-Z0-9_]+)`", line.split("|")[1]))
    return names


def read_variables() -> set[str]:
    """Every variable users' code paths read."""
    return (variables_in_source() | settings_variables()) - TEST_ONLY_VARIABLES


def test_anchors_follow_githubs_slug_rules() -> None:
    assert slug("A job's life") == "a-jobs-life"
    assert slug("Bulk files: `embedstream submit`") == "bulk-files-embedstream-submit"
    assert slug("`GET /v1/jobs/{id}`") == "get-v1jobsid"
    assert slug("Prompts: `prompt` and `prompt_name`") == "prompts-prompt-and-prompt_name"
    assert slug("Connecting a desktop agent (stdio)") == "connecting-a-desktop-agent-stdio"


def test_every_relative_link_in_the_docs_resolves() -> None:
    problems = [f"{path.relative_to(ROOT)}: {reason}"
                for path in doc_files()
                for target in links(path)
                if (reason := broken_link(path, target)) is not None]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_docs_link_to_each_other() -> None:
    targets = {target.partition("#")[0] for target in links(README)}
    for page in ("docs/architecture.md", "docs/api.md", "docs/mcp.md", "docs/operations.md",
                 "docs/features.md", "bench/README.md"):
        assert page in targets, f"README.md does not link to {page}"


def test_every_variable_the_code_reads_is_in_the_configuration_table() -> None:
    missing = sorted(read_variables() - configuration_table())
    assert not missing, f"not in README.md's configuration table: {', '.join(missing)}"


def test_the_configuration_table_lists_only_variables_the_code_reads() -> None:
    stale = sorted(configuration_table() - read_variables())
    assert not stale, f"in README.md's configuration table, read by no code: {', '.join(stale)}"


def test_the_readme_stays_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference to docs/"
