"""TSSR with its image encoder in the graph (content_mode: finetune, content_modality: image): the
economies against the original regime, and LoRA against tuning the top blocks, side by side in one
process on the same batches.

    OMP_NUM_THREADS=1 python benchmarks/bench_image_finetune.py --dataset clipart --batch_size 32 --batches 3

Variants (all TSSR, the image feature's encoder -- on clipart EfficientNet-Lite0 with real ImageNet
weights -- top ``--trainable`` blocks trainable):

* ``B x L, no caches``: every one of the B x L positions (padding included) decoded from its file and
  pushed through the whole network each step (the released TSSR code's regime);
* ``distinct items``: each distinct item of the batch once, still decoded and run whole each step;
* ``+ pixel cache``: ... decoded once, kept as uint8;
* ``+ lower cache`` (the default): ... and the frozen lower part run once per item;
* ``+ LoRA``: the default with LoRA adapters (rank ``--lora_r``) on the top blocks instead of
  tuning them;
* ``side adapter``: the network wholly frozen, its per-depth pooled states cached once per item and
  a side network (``--side_bottleneck``) trained on them (``encoder_peft: side``, IISAN-style).

Each variant trains on the same ``--batches`` batches twice: the first pass fills the caches (what an
epoch costs the first time), the second is the steady state (every later epoch). Times are medians
per step; variants alternate batch by batch so background load hits all alike.
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


def build(dataset, overrides):
    argv = sys.argv
    sys.argv = sys.argv[:1]
    try:
        config = MMConfig(model="TSSR", dataset=dataset, config_dict=overrides)
    finally:
        sys.argv = argv
    init_seed(config["seed"], True)
    ds = create_dataset(config)
    train, _valid, _test = data_preparation(config, ds)
    return get_model("TSSR")(config, train._dataset), train


def cache_mb(net):
    enc = net.content.encoders["image"]
    if hasattr(enc, "base"):  # side adapter: its tap cache
        return 0.0, (enc.cache.nbytes() + enc.out_cache.nbytes()) / 2 ** 20
    pix = enc.pixel_cache.nbytes() if enc.pixel_cache is not None else 0
    low = enc.lower_cache.nbytes() if enc.lower_cache is not None else 0
    return pix / 2 ** 20, low / 2 ** 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="clipart")
    ap.add_argument("--hidden_size", type=int, default=64)
    ap.add_argument("--max_len", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--trainable", type=int, default=1)
    ap.add_argument("--lora_r", type=int, default=8)
    ap.add_argument("--side_bottleneck", type=int, default=64)
    ap.add_argument("--skip_faithful", action="store_true", help="leave out the slowest variant")
    args = ap.parse_args()
    common = {
        "hidden_size": args.hidden_size, "MAX_ITEM_LIST_LENGTH": args.max_len, "train_batch_size": args.batch_size,
        "show_progress": False, "state": "ERROR", "use_gpu": torch.cuda.is_available(), "seed": 2020,
        "content_modality": "image", "content_mode": "finetune", "image_trainable_layers": args.trainable,
        "rezero": False,
    }
    off = {"encoder_unique_items": False, "image_cache_pixels": False, "encoder_cache_lower": False}
    variants = [
        ("B x L, no caches (original)", off),
        ("distinct items", dict(off, encoder_unique_items=True)),
        ("+ pixel cache", {"encoder_cache_lower": False}),
        ("+ lower cache (default)", {}),
        (f"+ LoRA r={args.lora_r} (instead of tuning the blocks)", {"encoder_peft": "lora", "lora_r": args.lora_r}),
        (f"side adapter, bottleneck {args.side_bottleneck} (network frozen)",
         {"encoder_peft": "side", "side_bottleneck": args.side_bottleneck}),
    ]
    if args.skip_faithful:
        variants = variants[1:]
    nets, loaders = [], []
    for _name, over in variants:
        net, train = build(args.dataset, dict(common, **over))
        nets.append(net)
        loaders.append(train)
    # the same batches for every variant (one loader's first batches; the variants' data are identical)
    batches = []
    for inter in loaders[0]:
        batches.append(inter)
        if len(batches) == args.batches:
            break
    opts = []
    for net in nets:
        groups = net.optimizer_param_groups()
        opts.append(torch.optim.Adam(groups, lr=1e-3))
        net.train()
    first = [[] for _ in nets]
    steady = [[] for _ in nets]
    for p in range(2):
        for inter in batches:
            for k, (net, opt) in enumerate(zip(nets, opts)):
                if p == 1 and variants[k][1] is off:
                    continue  # no cache: the second pass costs the same; not repeated
                t0 = time.perf_counter()
                opt.zero_grad()
                sum(net.calculate_loss(inter)).backward()
                opt.step()
                (first if p == 0 else steady)[k].append(time.perf_counter() - t0)
    positions = batches[0]["item_id_list"].numel() + batches[0]["item_id"].numel()
    distinct = len(torch.unique(torch.cat([b["item_id_list"].reshape(-1) for b in batches[:1]])))
    enc0 = nets[-2].content.encoders["image"]
    print(f"\n## TSSR image finetune on {args.dataset}: {type(enc0.encoder).__name__} ({enc0.split.kind if enc0.split else 'no split'}, "
          f"{enc0.n_blocks} blocks, top {args.trainable} trainable), batch {args.batch_size} x {args.max_len} positions, "
          f"{args.batches} batches, hidden {args.hidden_size}, {torch.get_num_threads()} thread(s), "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}\n")
    print(f"first batch: {positions} positions (history + target), {distinct} distinct items in the history\n")
    print("| variant | trainable encoder params | step, first pass (s) | step, steady (s) | speed-up vs original, steady | caches (pixels / lower or taps, MiB) |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(first[0]) if not args.skip_faithful else None
    for k, (name, over) in enumerate(variants):
        n_params = sum(p.numel() for p in nets[k].content.encoders["image"].parameters() if p.requires_grad)
        f = statistics.median(first[k])
        s = statistics.median(steady[k]) if steady[k] else f
        pix, low = cache_mb(nets[k])
        speed = f"{base / s:.1f}x" if base else "—"
        print(f"| {name} | {n_params:,} | {f:.2f} | {s:.2f} | {speed} | {pix:.0f} / {low:.0f} |")


if __name__ == "__main__":
    main()
