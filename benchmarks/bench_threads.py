"""Torch CPU threads for a training batch, measured side by side: 1 thread vs all cores.

    python benchmarks/bench_threads.py [--model=SASRec] [--dataset=ml-100k] [--batches=15] [--rounds=3]

Builds the model and its training data through the plugin's runner pieces, then times
``--batches`` training steps (forward, backward, Adam) with each thread count, alternating the
counts ``--rounds`` times so that both see the same machine load. Prints the seconds per batch,
the ratio and the load average. Run it on an idle machine and again with other work running.
"""

import argparse
import os
import sys
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="SASRec")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--batches", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden_size", type=int, default=64)
    args = p.parse_args(argv)
    sys.argv = sys.argv[:1]
    import recbole_mm  # noqa: F401
    from recbole.data import data_preparation

    from recbole_mm.config import MMConfig
    from recbole_mm.quick_start import create_dataset
    from recbole_mm.registry import get_model

    config = MMConfig(model=args.model, dataset=args.dataset,
                      config_dict={"hidden_size": args.hidden_size, "show_progress": False, "state": "ERROR"})
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train._dataset)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = []
    for i, inter in enumerate(train):
        batches.append(inter)
        if len(batches) >= args.batches:
            break
    cores = len(os.sched_getaffinity(0))
    times = {1: [], cores: []}
    for _ in range(args.rounds):
        for n in (1, cores):
            torch.set_num_threads(n)
            model.train()
            t0 = time.perf_counter()
            for inter in batches:
                loss = model.calculate_loss(inter)
                loss = sum(loss) if isinstance(loss, tuple) else loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[n].append((time.perf_counter() - t0) / len(batches))
    best = {n: min(v) for n, v in times.items()}
    print(f"{args.model} on {args.dataset}, hidden {args.hidden_size}, batch {config['train_batch_size']}, "
          f"L={config['MAX_ITEM_LIST_LENGTH']}, load average {os.getloadavg()[0]:.2f}")
    for n in times:
        print(f"  {n} thread(s): {best[n]:.3f} s/batch (best of {args.rounds}; all: "
              + ", ".join(f"{t:.3f}" for t in times[n]) + ")")
    print(f"  ratio {cores} threads / 1 thread: {best[cores] / best[1]:.2f}")


if __name__ == "__main__":
    main()
