"""Throughput of recbole_mm's text encoding on CPU.

Compares, on the same N ml-100k item texts (title + year + genres) with the bundled
all-MiniLM-L6-v2 encoder:

* ``encode_texts``          -- the library path (tokenize once, length-sorted batches, masked mean
                               pooling, order restored);
* one item at a time        -- a naive loop: tokenize + forward + pooling per item, timed on an
                               evenly strided sample of the same N texts (``--loop_n``, default 128;
                               ``--loop_n 0`` = all N) and reported per item: on a busy 2-core machine
                               the loop runs at ~5 items/s, so all 512 would take minutes;
* bare forward (sorted)     -- only ``model(**batch)`` on pre-tokenized, length-sorted batches of the
                               same size (tokenization, pooling and copies excluded): the floor;
* bare forward (input order)-- the same on batches in the input order (what sorting saves).

Goals: encode_texts >= 5x the one-at-a-time loop; overhead vs the sorted bare forward < 30%.

    python benchmarks/bench_extract.py [--n 512] [--batch_size 64] [--threads T] [--repeat 2] [--loop_n 128]
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recbole_mm.data.extract import _load_text_encoder, encode_texts, read_item_texts  # noqa: E402

TEMPLATE = "{movie_title} ({release_year}). Genres: {class}"


def _ml100k_item():
    import recbole

    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k", "ml-100k.item")


def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _best(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="number of ml-100k item texts")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per batched method; the best is reported")
    p.add_argument("--loop_n", type=int, default=128,
                   help="texts (evenly strided among the N) for the one-at-a-time loop; 0 = all N")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    _, texts = read_item_texts(_ml100k_item(), template=TEMPLATE)
    texts = texts[: args.n]
    n = len(texts)
    tokenizer, model = _load_text_encoder("default", device, False)

    # warm-up (first-call allocations, kernel selection)
    encode_texts(texts[:args.batch_size], batch_size=args.batch_size, device="cpu", show_progress=False)

    def library():
        return encode_texts(texts, batch_size=args.batch_size, max_length=args.max_length, device="cpu",
                            show_progress=False)

    loop_idx = np.arange(n) if not args.loop_n or args.loop_n >= n else \
        np.linspace(0, n - 1, args.loop_n).round().astype(int)

    def one_at_a_time():
        rows = []
        with torch.inference_mode():
            for t in (texts[i] for i in loop_idx):
                enc = tokenizer(t, truncation=True, max_length=args.max_length, return_tensors="pt")
                out = model(**enc)
                rows.append(_mean_pool(out.last_hidden_state, enc["attention_mask"])[0].numpy())
        return np.stack(rows)

    def pretokenized(order):
        batches = []
        for b in range(0, n, args.batch_size):
            sel = [texts[i] for i in order[b:b + args.batch_size]]
            batches.append(tokenizer(sel, truncation=True, max_length=args.max_length, padding=True,
                                     return_tensors="pt"))
        return batches

    lengths = np.array([len(x) for x in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]])
    sorted_batches = pretokenized(np.argsort(-lengths, kind="stable"))
    input_batches = pretokenized(np.arange(n))

    def bare(batches):
        def run():
            with torch.inference_mode():
                for enc in batches:
                    model(**enc)
        return run

    t_lib, emb = _best(library, args.repeat)
    t_bare_sorted, _ = _best(bare(sorted_batches), args.repeat)
    t_bare_input, _ = _best(bare(input_batches), args.repeat)
    t_loop_sample, emb_loop = _best(one_at_a_time, 1)
    t_loop = t_loop_sample * n / len(loop_idx)  # per-item rate extrapolated to the N items
    max_diff = float(np.abs(emb[loop_idx] - emb_loop).max())

    speedup = t_loop / t_lib
    overhead = t_lib / t_bare_sorted - 1.0
    cmd = "python benchmarks/bench_extract.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print("### Text feature extraction throughput (all-MiniLM-L6-v2, CPU)\n")
    print(f"`{cmd.strip()}`  \n{n} ml-100k item texts (template `{TEMPLATE}`, mean {lengths.mean():.1f} tokens, "
          f"max {lengths.max()}), batch size {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU(s) {platform.machine()}, "
          f"batched methods best of {args.repeat}\n")
    print("| method | seconds | items/s | encode_texts speed-up |")
    print("|---|---:|---:|---:|")
    loop_note = "" if len(loop_idx) == n else f" [timed on {len(loop_idx)} of the {n}, scaled to {n}]"
    rows = [
        ("`encode_texts` (batched, length-sorted)", t_lib),
        (f"one item at a time (tokenize + forward + pool){loop_note}", t_loop),
        ("bare batched forward, pre-tokenized, length-sorted", t_bare_sorted),
        ("bare batched forward, pre-tokenized, input order", t_bare_input),
    ]
    for label, t in rows:
        print(f"| {label} | {t:.2f} | {n / t:.1f} | {t / t_lib:.2f}x |")
    print()
    print(f"- speed-up vs one-at-a-time: **{speedup:.1f}x** (goal >= 5x: {'met' if speedup >= 5 else 'NOT met'})")
    print(f"- overhead vs bare sorted forward (tokenize, pad, pool, copy included): **{100 * overhead:+.1f}%** "
          f"(goal < 30%: {'met' if overhead < 0.30 else 'NOT met'})")
    print(f"- gain from length sorting (bare forward, input order / sorted): {t_bare_input / t_bare_sorted:.2f}x")
    print(f"- max |encode_texts - one-at-a-time| over the looped items = {max_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
