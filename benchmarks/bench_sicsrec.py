"""SICSRec step-2 speed against SASRec (= SICSRec's step 1), side by side in one process.

    python benchmarks/bench_sicsrec.py --dataset=Bili_Food --data_path=dataset/ --hidden_size=64 --repeats=3

Both models train on the same loader (the same samples, batch size and MAX_ITEM_LIST_LENGTH)
through RecBole's own epoch loop (``Trainer._train_epoch``: SASRec with the plain trainer,
SICSRec with ``SICSRecTrainer``, i.e. step 2 with the frozen ID Transformer and the adapters).
Epochs alternate (SASRec, SICSRec, SASRec, ...) after one warm-up batch each, so load on a
shared machine hits both alike; medians are reported, and the full-ranking validation time.
Content features: the raw feature-store text features (``stage1: False``) unless ``--stage1``;
the step-2 cost does not depend on which table feeds it, only on its width.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recbole_mm  # noqa: E402,F401
from recbole.data import data_preparation  # noqa: E402
from recbole.model.sequential_recommender.sasrec import SASRec  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_mm.config import MMConfig  # noqa: E402
from recbole_mm.model.sicsrec import SICSRec, step1_config  # noqa: E402
from recbole_mm.quick_start import create_dataset  # noqa: E402
from recbole_mm.registry import get_trainer  # noqa: E402


def _epoch(trainer, loader, idx):
    t0 = time.perf_counter()
    trainer._train_epoch(loader, idx)
    return time.perf_counter() - t0


@torch.inference_mode()
def _eval(model, loader):
    model.eval()
    t0 = time.perf_counter()
    for batch in loader:
        model.full_sort_predict(batch[0].to(model.device))
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="Bili_Food")
    ap.add_argument("--data_path", default="dataset/")
    ap.add_argument("--hidden_size", type=int, default=256)
    ap.add_argument("--inner_size", type=int, default=None, help="default: hidden_size")
    ap.add_argument("--batch_size", type=int, default=1024)
    ap.add_argument("--max_len", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per model (after one warm-up batch)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--stage1", action="store_true", help="use (and build if missing) the stage-1 tables")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "data_path": args.data_path, "hidden_size": args.hidden_size,
        "inner_size": args.inner_size or args.hidden_size, "MAX_ITEM_LIST_LENGTH": args.max_len,
        "train_batch_size": args.batch_size, "eval_batch_size": 2048, "stage1": bool(args.stage1),
        "show_progress": False, "state": "ERROR", "use_gpu": torch.cuda.is_available(), "seed": 2024,
        "checkpoint_dir": os.path.join(args.data_path, ".bench_saved"),
    }
    argv_saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        config = MMConfig(model="SICSRec", dataset=args.dataset, config_dict=overrides)
    finally:
        sys.argv = argv_saved
    init_seed(config["seed"], True)
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    t_data = time.perf_counter() - t0

    cfg1 = step1_config(config)
    sas = SASRec(cfg1, train._dataset).to(config["device"])
    sics = SICSRec(config, train._dataset).to(config["device"])
    sics.load_id_encoder(sas.state_dict())
    t_sas = get_trainer(cfg1["MODEL_TYPE"], "SASRec")(cfg1, sas)
    t_sics = get_trainer(config["MODEL_TYPE"], "SICSRec")(config, sics)

    batch = next(iter(train)).to(config["device"])
    for model in (sas, sics):  # warm-up: one forward/backward each (allocations, kernel choice)
        model.train()
        loss = model.calculate_loss(batch)
        (sum(loss) if isinstance(loss, tuple) else loss).backward()
        model.zero_grad(set_to_none=True)
    times = {"SASRec": [], "SICSRec": []}
    for r in range(args.repeats):
        times["SASRec"].append(_epoch(t_sas, train, r + 1))
        times["SICSRec"].append(_epoch(t_sics, train, r + 1))
    ev = {"SASRec": _eval(sas, valid), "SICSRec": _eval(sics, valid)}
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in (("SASRec", sas),
                                                                                          ("SICSRec", sics))}
    device = str(config["device"])
    print(f"\n## SICSRec step 2 vs SASRec on {args.dataset} (hidden {args.hidden_size}, inner "
          f"{overrides['inner_size']}, {config['n_layers']} layers, max len {args.max_len}, batch {args.batch_size}, "
          f"{len(train)} batches/epoch, {len(train.dataset)} samples; device {device}, "
          f"{torch.get_num_threads()} threads; content {', '.join(sics.feature_names.values())} "
          f"{'x'.join(str(t.embedding_dim) for t in sics.content_tables.values())}-d)\n")
    print("| measure | SASRec | SICSRec step 2 | SICSRec / SASRec |")
    print("|---|---|---|---|")
    print(f"| train epoch, median of {args.repeats} (s) | {med['SASRec']:.2f} | {med['SICSRec']:.2f} | "
          f"{med['SICSRec'] / med['SASRec']:.2f}x |")
    print(f"| full-ranking validation (s) | {ev['SASRec']:.2f} | {ev['SICSRec']:.2f} | "
          f"{ev['SICSRec'] / ev['SASRec']:.2f}x |")
    print(f"| trainable parameters | {n_params['SASRec']:,} | {n_params['SICSRec']:,} | |")
    print(f"\nepoch times (s): SASRec {[round(x, 2) for x in times['SASRec']]}, "
          f"SICSRec {[round(x, 2) for x in times['SICSRec']]}; data loading {t_data:.1f}s")
    result = {
        "dataset": args.dataset, "hidden_size": args.hidden_size, "inner_size": overrides["inner_size"],
        "n_layers": config["n_layers"], "batch_size": args.batch_size, "max_len": args.max_len,
        "batches_per_epoch": len(train), "device": device, "threads": torch.get_num_threads(),
        "epoch_s": times, "epoch_median_s": med, "ratio": med["SICSRec"] / med["SASRec"], "valid_eval_s": ev,
        "trainable_params": n_params, "host": platform.node(), "torch": torch.__version__,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
