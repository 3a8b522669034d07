#!/usr/bin/env python
"""Thin wrapper: same as `python -m recbole_mm.data.convert ninerec ...`.

Run `python dataset/convert_ninerec.py --help` for the options (see dataset/README.md).
"""
import sys
from pathlib import Path

try:
    from recbole_mm.data.convert import main
except ImportError:  # running from a source checkout without pip install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from recbole_mm.data.convert import main

if __name__ == "__main__":
    sys.exit(main(["ninerec", *sys.argv[1:]]))
