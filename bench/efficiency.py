"""The HimNet paper's efficiency table on this machine: ``python bench/efficiency.py ...`` is
``stfast bench efficiency ...`` (see :mod:`stfast.benchmarks.efficiency` for the options,
the columns and the expected durations).

    python bench/efficiency.py --quick            # a few minutes on 2 CPU cores
    python bench/efficiency.py --device cuda      # the full table on a GPU
"""

import sys
from pathlib import Path

try:
    from stfast.benchmarks.efficiency import main
except ImportError:  # a checkout that is not installed: use the package beside this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stfast.benchmarks.efficiency import main

if __name__ == "__main__":
    raise SystemExit(main())
