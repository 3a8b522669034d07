"""docs/BENCHMARKS.md's generated part is the one benchmarks/make_reference.py writes from the
committed results: a result added without regenerating the reference fails here."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_benchmarks_reference_is_up_to_date():
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "make_reference.py"), "--check"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:] + \
        "\nrun: python benchmarks/make_reference.py"
