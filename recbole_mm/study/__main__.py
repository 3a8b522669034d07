"""``python -m recbole_mm.study``: the study's command line (:func:`recbole_mm.study.cli.main`); each
cell of a study runs as ``python -m recbole_mm.study --run-cell <cell.json>``."""

import sys

from recbole_mm.study.cli import main

if __name__ == "__main__":
    sys.exit(main())
