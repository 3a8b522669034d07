"""Entry point: ``python run_recbole_mm.py --model=TSSR --dataset=ml-100k [--key=value ...]``."""

import sys

from recbole_mm.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
