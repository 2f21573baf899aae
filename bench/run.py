"""Run every benchmark in this folder, one after the other: ``python bench/run.py``.

Each ``bench_*.py`` measures locksafe against a baseline measured in the same run and prints a
table of medians and ratios. Exit status is non-zero if any benchmark fails.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(script)], check=False)
        print(f"   ({time.monotonic() - started:.1f} s, exit {result.returncode})\n", flush=True)
        if result.returncode != 0:
            failed.append(script.name)
    if failed:
        print("failed:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
