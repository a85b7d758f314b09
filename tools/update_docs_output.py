"""Rerun every documented `console` block and write what each command prints now into the docs.

    python tools/update_docs_output.py          # rewrite README.md and docs/*.md in place
    python tools/update_docs_output.py --check  # only list the blocks that are out of date

`tests/test_docs_output.py` fails when a documented output is stale; after a change that alters
what a teaching command prints (on purpose), run this, then read the diff before committing: it
should show only the change you meant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_docs_output import BLOCK, lines, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale blocks, change nothing")
    args = parser.parse_args()
    stale = 0
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        out, last = [], 0
        for m in BLOCK.finditer(text):
            got = "\n".join(lines(run(m["command"]))) + "\n"
            if lines(got) != lines(m["output"]):
                stale += 1
                print(f"{page.name}: `{m['command']}` is out of date", file=sys.stderr)
            out += [text[last: m.start("output")], got]
            last = m.end("output")
        out.append(text[last:])
        if not args.check:
            page.write_text("".join(out))
    print(f"{stale} stale block(s)" + ("" if args.check else " rewritten"), file=sys.stderr)


if __name__ == "__main__":
    main()
