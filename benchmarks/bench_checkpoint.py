"""Checkpoint size of a content model with and without its frozen feature tables.

    python benchmarks/bench_checkpoint.py --dataset synth_cat100k [--model TSSR] [--hidden-size 64]

Builds the model on the dataset (its features from the feature store, e.g. written by
``gen_synthetic.py --text-dim 384``) and serialises its ``state_dict`` as the trainer does
(``torch.save``) twice: as it is now (each frozen table replaced by its sha256) and as it was
before (the tables themselves, which is what ``state_dict`` held until 2026-12-04).
"""

import argparse
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--data_path", default=os.path.join(ROOT, "benchmarks", "data", ""))
    p.add_argument("--model", default="TSSR")
    p.add_argument("--hidden-size", type=int, default=64)
    args = p.parse_args(argv)
    sys.argv = sys.argv[:1]
    sys.path.insert(0, ROOT)
    import torch

    from recbole_mm.config import MMConfig
    from recbole_mm.data.lazy import data_preparation
    from recbole_mm.quick_start import create_dataset
    from recbole_mm.registry import get_model

    config = MMConfig(model=args.model, dataset=args.dataset, config_dict={
        "data_path": args.data_path, "hidden_size": args.hidden_size, "show_progress": False, "state": "WARNING"})
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    model = get_model(args.model)(config, train._dataset)
    now = model.state_dict()
    before = {k: v for k, v in now.items() if not k.endswith(".sha256")}
    for name, module in model.named_modules():
        if hasattr(module, "_table_sha256"):
            before[f"{name}.weight"] = module.weight.detach()

    def size(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.tell() / 2 ** 20

    a, b = size(before), size(now)
    print(f"`python benchmarks/bench_checkpoint.py --dataset {args.dataset} --model {args.model} "
          f"--hidden-size {args.hidden_size}`\n\n{args.model} on {args.dataset} ({dataset.item_num:,} items incl. padding)\n\n"
          f"| state_dict | MiB |\n|---|---|\n| before (frozen tables saved) | {a:.1f} |\n"
          f"| now (sha256 per table) | {b:.1f} |\n| before / now | {a / b:.1f} |")


if __name__ == "__main__":
    main()
