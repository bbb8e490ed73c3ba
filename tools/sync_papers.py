"""Refresh rlfleet/data/papers.json from the team's catalogue (../shared/papers.md).

Run at development time when papers.md changes: `python tools/sync_papers.py [path/to/papers.md]`.
The project reads only its own copy at run time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "papers.md"
TARGET = ROOT / "rlfleet" / "data" / "papers.json"
COLUMNS = ("id", "title", "family", "rule", "priority")


def parse_papers_md(text: str) -> list[dict[str, str]]:
    papers = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0].startswith("P") and cells[0][1:].isdigit():
            papers.append(dict(zip(COLUMNS, cells[:5])))
    return papers


def main(argv: list[str]) -> int:
    source = Path(argv[1]) if len(argv) > 1 else DEFAULT_SOURCE
    papers = parse_papers_md(source.read_text())
    if not papers:
        print(f"no paper rows found in {source}", file=sys.stderr)
        return 1
    TARGET.write_text(json.dumps(papers, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(papers)} papers to {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
