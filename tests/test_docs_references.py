"""Every `docs/PAGE.md#anchor` the code, tests, benchmarks and docs cite names a page that exists
and a heading (or `<a id>`) on it, so a reader following a citation lands on the fact."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([a-z0-9_-]+\.md)(?:#([A-Za-z0-9_-]+))?")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        found.update(re.findall(r'<a id="([^"]+)"></a>', line))
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def citing_files():
    for folder in ("vramplan", "tests", "benchmarks", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".sh", ".toml") and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "README.md"


def test_slug_follows_github():
    assert slug("FSDP SHARD_GRAD_OP") == "fsdp-shard_grad_op"
    assert slug("phi3 at Phi-4 sizes") == "phi3-at-phi-4-sizes"
    assert slug("`round_size` and power-of-two divisions") == "round_size-and-power-of-two-divisions"


def test_every_cited_page_and_anchor_exists():
    pages = {p.name: anchors(p) for p in (ROOT / "docs").glob("*.md")}
    broken, checked = [], 0
    for path in citing_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for page, anchor in CITATION.findall(line):
                checked += 1
                where = f"{path.relative_to(ROOT)}:{number}"
                if page not in pages:
                    broken.append(f"{where}: docs/{page} does not exist")
                elif anchor and anchor not in pages[page]:
                    broken.append(f"{where}: docs/{page}#{anchor} names no heading")
    assert checked > 300          # the citations are there to be checked
    assert broken == []
