"""Stage 1 of SICSRec alone, from the command line (e.g. before a multi-GPU run)::

    python -m recbole_mm.model.sicsrec_stage1 --dataset=Bili_Food [--config_files=...] [--key=value ...]
    python -m recbole_mm.model.sicsrec.cli --dataset=Bili_Food [...]      (the same)

The settings are read as for a run (``MMConfig`` with SICSRec's YAML defaults); the stage-1
features are built (or found up to date) exactly as a training run would build them.
"""

from __future__ import annotations

import sys

from recbole_mm.model.sicsrec.dataset import SICSRecDataset
from recbole_mm.model.sicsrec.settings import stage1_feature_names


def main(argv=None):
    """``python -m recbole_mm.model.sicsrec_stage1 --dataset=NAME [--config_files=...] [--key=value ...]``"""
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m recbole_mm.model.sicsrec_stage1",
                                     description="Run SICSRec stage 1 (pairs, alignment, export) for a dataset.")
    parser.add_argument("--dataset", "-d", required=True)
    parser.add_argument("--config_files", default=None)
    args, _ = parser.parse_known_args(argv)

    import recbole_mm  # noqa: F401
    from recbole.utils import init_logger
    from recbole_mm.config import MMConfig

    overrides = [a for a in argv if a.startswith("--") and "=" in a and not a.startswith(("--dataset", "--config_files"))]
    saved = sys.argv
    sys.argv = [saved[0]] + overrides
    try:
        config = MMConfig(model="SICSRec", dataset=args.dataset,
                          config_file_list=args.config_files.split() if args.config_files else None,
                          config_dict={"stage1": True})
    finally:
        sys.argv = saved
    init_logger(config)
    dataset = SICSRecDataset(config)
    for name in stage1_feature_names(config).values():
        print(f"{name}: {tuple(dataset.mm_features[name].shape)} aligned; stats {dataset.mm_stats[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
