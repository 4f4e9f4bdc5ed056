"""Rebuild a sweep's report: ``python src/report.py logs/train/multiruns/<time>_<pid>``.

Writes report.md, report.csv and report.png into the sweep directory (what every multirun
already writes when it ends) and prints the table. See nanoforge/report.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

from nanoforge.report import main

if __name__ == "__main__":
    sys.exit(main())
