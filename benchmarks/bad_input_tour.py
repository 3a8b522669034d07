"""What a user sees for each bad input of issue 15, through the CLI, as a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/bad_input_tour.py [--out docs/bad_input_tour.md]

Each case writes a small dataset (or config file) into a temporary folder, runs
``run_recbole_mm.py --model=SASRec`` on it (1 epoch, hidden 16) and reports the exit code, the
wall time and the first line of the error (or, for a run that goes through, its outcome).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from conftest import write_tiny_dataset  # noqa: E402

FAST = ["--epochs=1", "--hidden_size=16", "--inner_size=16", "--n_layers=1", "--n_heads=1",
        "--MAX_ITEM_LIST_LENGTH=10", "--show_progress=False", "--state=WARNING", "--valid_metric=Hit@10"]


def rewrite(path, fn):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    mode = "wb" if isinstance(fn(text), bytes) else "w"
    with open(path, mode) as f:
        f.write(fn(text))


def cases():
    """(name, how the input is broken: fn(folder) -> extra CLI args)"""
    def inter(folder):
        return os.path.join(folder, "data", "tiny", "tiny.inter")

    def doubled(folder):
        rewrite(inter(folder), lambda t: "\n".join([t.split("\n")[0]] + [r for r in t.strip().split("\n")[1:]
                                                                          for _ in (0, 1)]) + "\n")
        return []

    def header(new):
        def f(folder):
            rewrite(inter(folder), lambda t: new + "\n" + t.split("\n", 1)[1])
            return []
        return f

    def content(fn):
        def f(folder):
            rewrite(inter(folder), fn)
            return []
        return f

    def yaml_file(text):
        def f(folder):
            path = os.path.join(folder, "my.yaml")
            with open(path, "w") as fh:
                fh.write(text)
            return ["--config_files=my.yaml"]
        return f

    def non_utf8(folder):
        with open(inter(folder), "ab") as fh:
            fh.write(b"u1\ti\xe9t\xe9\t99999\n")
        return []

    return [
        ("clean file (reference)", lambda folder: []),
        ("every .inter row doubled", doubled),
        ("typo'd key in YAML (hiden_size)", yaml_file("hiden_size: 16\n")),
        ("typo'd key on the command line", lambda folder: ["--hiden_size=16"]),
        ("wrong type (learning_rate: fast)", yaml_file("learning_rate: fast\n")),
        ("--epochs=-1", lambda folder: ["--epochs=-1"]),
        ("--epochs=0", lambda folder: ["--epochs=0"]),
        ("valid_metric not among metrics x topk", lambda folder: ["--valid_metric=NDCG@50"]),
        ("missing --config_files path", lambda folder: ["--config_files=nope.yaml"]),
        ("malformed YAML", yaml_file("epochs: 1\nhidden_size: [16,\nn_layers: 1\n")),
        (".inter without :type headers", header("user_id\titem_id\ttimestamp")),
        (".inter without the item id column", header("user_id:token\tthing:token\ttimestamp:float")),
        ("empty .inter", content(lambda t: "")),
        ("header-only .inter", content(lambda t: t.split("\n")[0] + "\n")),
        ("non-numeric float column", content(lambda t: t.replace("\t1002\n", "\tyesterday\n", 1))),
        ("comma-delimited .inter", content(lambda t: t.replace("\t", ","))),
        ("untyped extra column", header("user_id:token\titem_id:token\ttimestamp:float\tnote")),
        ("non-UTF-8 bytes", non_utf8),
        ("missing dataset", lambda folder: ["--dataset=no_such_data"]),
        ("misspelled model", lambda folder: ["--model=SASRek"]),
    ]


def run_case(name, breaker):
    with tempfile.TemporaryDirectory(prefix="tour-") as folder:
        write_tiny_dataset(os.path.join(folder, "data"))
        extra = breaker(folder)
        args = ["--model=SASRec", "--dataset=tiny", "--data_path=data"] + FAST
        for e in extra:  # later options win
            key = e.split("=", 1)[0]
            args = [a for a in args if a.split("=", 1)[0] != key] + [e]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(REPO, "run_recbole_mm.py"), *args], cwd=folder,
                              capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        if proc.returncode == 0:
            test = next((line for line in proc.stdout.splitlines() if line.startswith("test result")), "")
            hit = re.search(r"hit@10: ([0-9.]+)", test)
            warn = ""
            logs = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(folder, "log")) for f in fs
                    if f.endswith(".log")]
            for path in logs:
                for line in open(path, encoding="utf-8"):
                    if "interactions are" in line:
                        warn = line.split("WARNING", 1)[-1].strip()
                        warn = re.sub(r"\x1b\[[0-9;]*m", "", warn)
            outcome = f"runs; test Hit@10 = {hit.group(1) if hit else '?'}" + (f"; logged: {warn}" if warn else "")
        else:
            outcome = err[0] if err else f"(no stderr; stdout: {proc.stdout.strip()[-200:]})"
        tb = "Traceback" in proc.stderr
        return proc.returncode, wall, outcome, tb, len(err)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    rows = ["| case | exit | s | traceback | stderr lines | what the user sees (first line) |",
            "|---|---|---|---|---|---|"]
    for name, breaker in cases():
        code, wall, outcome, tb, n = run_case(name, breaker)
        cell = outcome.replace("|", "\\|")
        if len(cell) > 400:
            cell = cell[:400] + " ..."
        rows.append(f"| {name} | {code} | {wall:.1f} | {'yes' if tb else 'no'} | {n} | {cell} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"Command: `OMP_NUM_THREADS=1 python benchmarks/bad_input_tour.py --out {args.out}`\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
