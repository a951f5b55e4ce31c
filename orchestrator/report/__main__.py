"""``python -m orchestrator.report``: the report CLI (orchestrator/report/cli.py)."""

import sys

from orchestrator.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
