"""Write the generated pages of the docs: ``python docs/generate.py``.

``docs/matrix.md`` comes from the dialect modules (``locksafe.matrix.render_markdown``);
``tests/test_docs.py`` fails when it is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from locksafe.matrix import render_markdown

MATRIX = Path(__file__).resolve().parent / "matrix.md"


def main() -> int:
    MATRIX.write_text(render_markdown(), encoding="utf-8")
    print(f"wrote {MATRIX}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
