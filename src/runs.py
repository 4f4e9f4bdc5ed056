"""List runs and sweep jobs, newest first: ``python src/runs.py`` (or ``make runs``).

Each row: when it started, its status (finished, stopped, failed, running), steps, final
val/loss, its directory and overrides. See nanoforge/runs.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

from nanoforge.runs import main

if __name__ == "__main__":
    sys.exit(main())
