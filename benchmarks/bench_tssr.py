"""TSSR speed against SASRec, measured side by side in one process on the same data.

    python benchmarks/bench_tssr.py --dataset=ml-100k --hidden_size=64 --batches=20

Reports (same dataset, hidden size, MAX_ITEM_LIST_LENGTH and batch size for every model):
1. training time per batch and per epoch: SASRec (RecBole's every-prefix samples, CE at the
   last position) vs TSSR frozen on the same samples (ce_positions: last) vs TSSR frozen in its
   default regime (sliding windows, CE at every position: far fewer samples per epoch);
2. full-ranking evaluation time (validation split) TSSR vs SASRec;
3. finetune step time: each unique item encoded once with cached frozen lower layers vs the
   original's regime (all B x L positions through the whole encoder), offline MiniLM encoder.
Epoch times are extrapolated from ``--batches`` timed batches (after one warm-up batch);
models alternate batch by batch, and evaluation passes alternate, so background load hits all alike.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recbole_mm  # noqa: E402,F401
from recbole.data import data_preparation  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_mm.config import MMConfig  # noqa: E402
from recbole_mm.quick_start import create_dataset  # noqa: E402
from recbole_mm.registry import get_model  # noqa: E402


def build(model, dataset, overrides):
    sys_argv = sys.argv
    sys.argv = sys.argv[:1]
    try:
        config = MMConfig(model=model, dataset=dataset, config_dict=overrides)
    finally:
        sys.argv = sys_argv
    init_seed(config["seed"], True)
    ds = create_dataset(config)
    train, valid, test = data_preparation(config, ds)
    net = get_model(model)(config, train._dataset)
    return config, net, train, valid


def time_train(nets, loaders, n_batches, lr=1e-3):
    """Median seconds per training batch of each model; models alternate batch by batch so that
    load from other processes hits them alike."""
    opts = [torch.optim.Adam([p for p in n.parameters() if p.requires_grad], lr=lr) for n in nets]
    iters = [iter(l) for l in loaders]
    times = [[] for _ in nets]
    for n in nets:
        n.train()
    for i in range(n_batches + 1):
        for k, (net, opt) in enumerate(zip(nets, opts)):
            try:
                inter = next(iters[k])
            except StopIteration:
                iters[k] = iter(loaders[k])
                inter = next(iters[k])
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = net.calculate_loss(inter)
            loss = sum(loss) if isinstance(loss, tuple) else loss
            loss.backward()
            opt.step()
            if i > 0:  # first batch is warm-up
                times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


@torch.inference_mode()
def time_eval(nets, loaders, repeats=3):
    """Best-of-``repeats`` seconds for a full-ranking pass over each loader, models alternating."""
    best = [float("inf")] * len(nets)
    for n in nets:
        n.eval()
    for _ in range(repeats):
        for k, (net, loader) in enumerate(zip(nets, loaders)):
            t0 = time.perf_counter()
            for batch in loader:
                net.full_sort_predict(batch[0])
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--hidden_size", type=int, default=64)
    ap.add_argument("--max_len", type=int, default=50)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--ft_steps", type=int, default=5)
    ap.add_argument("--ft_batch_size", type=int, default=32)
    ap.add_argument("--skip_finetune", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    common = {
        "hidden_size": args.hidden_size, "MAX_ITEM_LIST_LENGTH": args.max_len,
        "train_batch_size": args.batch_size, "eval_batch_size": 256, "show_progress": False,
        "state": "ERROR", "use_gpu": torch.cuda.is_available(), "seed": 2020,
    }
    rows = []
    _, sas, sas_train, sas_valid = build("SASRec", args.dataset, dict(common, n_layers=2, n_heads=2))
    _, tssr_p, tp_train, _ = build("TSSR", args.dataset, dict(common, train_windows="all_prefixes", ce_positions="last"))
    _, tssr, t_train, t_valid = build("TSSR", args.dataset, dict(common))
    t_sas, t_tp, t_ts = time_train([sas, tssr_p, tssr], [sas_train, tp_train, t_train], args.batches)
    n_sas, n_tp, n_ts = len(sas_train), len(tp_train), len(t_train)
    rows.append(("train batch (s), same samples", t_sas, t_tp, t_tp / t_sas))
    rows.append(("train epoch (s), same samples (all prefixes)", t_sas * n_sas, t_tp * n_tp, (t_tp * n_tp) / (t_sas * n_sas)))
    rows.append(("train epoch (s), TSSR default regime (sliding windows)", t_sas * n_sas, t_ts * n_ts, (t_ts * n_ts) / (t_sas * n_sas)))
    e_sas, e_ts = time_eval([sas, tssr], [sas_valid, t_valid])
    rows.append(("full-ranking evaluation, valid split (s)", e_sas, e_ts, e_ts / e_sas))

    print(f"\n## TSSR vs SASRec on {args.dataset} (hidden {args.hidden_size}, max len {args.max_len}, "
          f"batch {args.batch_size}, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"{torch.get_num_threads()} threads)\n")
    print("| measure | SASRec | TSSR | TSSR / SASRec |")
    print("|---|---|---|---|")
    for name, a, b, r in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {r:.2f}x |")
    print(f"\nbatches per epoch: SASRec {n_sas}, TSSR all-prefixes {n_tp}, TSSR sliding {n_ts}")

    if not args.skip_finetune:
        ft = dict(common, content_mode="finetune", encoder_trainable_layers=1, encoder_max_length=32,
                  train_batch_size=args.ft_batch_size)
        _, fast, f_train, _ = build("TSSR", args.dataset, ft)
        _, slow, s_train, _ = build("TSSR", args.dataset, dict(ft, encoder_unique_items=False, encoder_cache_lower=False))
        t_fast, t_slow = time_train([fast, slow], [f_train, s_train], args.ft_steps)
        print(f"\n## finetune step time, MiniLM (6 layers, top 1 trainable), batch {args.ft_batch_size}, "
              f"max len {args.max_len}\n")
        print("| regime | step (s) |")
        print("|---|---|")
        print(f"| all B x L positions through the whole encoder (original) | {t_slow:.3f} |")
        print(f"| unique items once + cached frozen lower layers (recbole_mm) | {t_fast:.3f} |")
        print(f"| speed-up | {t_slow / t_fast:.1f}x |")


if __name__ == "__main__":
    main()
