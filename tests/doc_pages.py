"""The documentation as the tests read it: README.md and every docs/*.md page, their fenced blocks, and the
`# needs: ...` marker a block that cannot run in a plain test carries as its first line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a block may need that a test on a fresh checkout does not have; any other `# needs:` is a typo.
NEEDS = ("hub", "gpu", "cluster", "server")
SHELL_LANGUAGES = ("bash", "sh", "shell")
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", flags=re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository, e.g. "docs/pipeline.md"
    line: int  # the line of its opening fence
    language: str
    text: str

    @property
    def needs(self) -> str | None:
        """What its first line says it needs ("hub", ...), or None for a block that must run as written."""
        first = self.text.split("\n", 1)[0].strip()
        marker = re.fullmatch(r"#\s*needs:\s*(.*)", first)
        return marker.group(1).strip() if marker else None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README first, then docs/pipeline.md (whose blocks save the model the others load), then the rest."""
    docs = sorted((REPO / "docs").glob("*.md"), key=lambda p: (p.name != "pipeline.md", p.name))
    return [REPO / "README.md", *docs]


def blocks(page: Path, languages: tuple[str, ...]) -> list[Block]:
    text = page.read_text()
    return [
        Block(str(page.relative_to(REPO)), text.count("\n", 0, found.start()) + 1, found.group(1), found.group(2))
        for found in FENCE.finditer(text)
        if found.group(1) in languages
    ]


def page_text(name: str) -> str:
    return (REPO / name).read_text()


def all_text() -> str:
    """README and every docs page, one after the other."""
    return "\n".join(page.read_text() for page in pages())
