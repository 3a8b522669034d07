"""Cold-item rules side by side on a finished cold-start study's checkpoints.

For every finished cell of the given models at one sparsity level, the cell's best checkpoint is
loaded once and its test split ranked (all items, RecBole's full ranking; ties count half) under
each ``cold_item_rule`` (``recbole_mm.model.layers.ColdRows``): ``mean``, ``content_ridge``,
``content_knn`` with 1 and 5 neighbours, and, as a chance reference that is not a rule of the
plugin, each cold item given the rows of a random warm item. The model's weights are the same for
every rule (training never ranks cold items, so the rule only acts at evaluation): the differences
are the rule's alone. Reports HR@10 / NDCG@10 of the users whose test target is cold, warm, and all.

    OMP_NUM_THREADS=1 python benchmarks/cold_rules.py --study benchmarks/results/cold_sparsity_food \\
        --data-path dataset --models TSSR SICSRec --level keep1 --out benchmarks/results/cold_rules_food
"""

import argparse
import glob
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RULES = (("mean", "mean", 1), ("content_ridge", "content_ridge", 1), ("content_knn k=1", "content_knn", 1),
         ("content_knn k=5", "content_knn", 5), ("random warm row (chance reference)", "random", 1))


class _RandomWarm:
    """Each cold item takes the rows of a random warm item (seeded): what a rule that ignores content
    but keeps a trained row's scale gets."""

    def __init__(self, warm, cold, seed=0):
        import torch

        warm_ids = torch.nonzero(warm).flatten()
        gen = torch.Generator().manual_seed(seed)
        self.rows = warm_ids[torch.randint(warm_ids.numel(), (int(cold.sum()),), generator=gen)]
        self.last = {}

    def predict(self, table):
        t = table.detach().reshape(table.shape[0], -1)
        return t[self.rows.to(t.device)].double().cpu()


def _rules_of(model):
    """The model's distinct ColdRows modules (TSSR shares one between its ID table and classifier)."""
    from recbole_mm.model.layers import ColdRows

    seen = {}
    for module in model.modules():
        if isinstance(module, ColdRows):
            seen[id(module)] = module
    return list(seen.values())


def _evaluate(model, test, cold, k=10):
    import torch

    out = {s: {"hit": 0.0, "ndcg": 0.0, "n": 0} for s in ("cold", "warm", "all")}
    with torch.no_grad():
        for batch in test:
            inter = batch[0]
            scores = model.full_sort_predict(inter).view(len(inter), -1)
            scores[:, 0] = -math.inf
            target = inter[model.POS_ITEM_ID]
            ts = scores.gather(1, target[:, None])
            rank = (scores > ts).sum(1).double() + ((scores == ts).sum(1).double() - 1) / 2  # ties: half
            hit = (rank < k).double()
            ndcg = torch.where(rank < k, 1.0 / torch.log2(rank + 2), torch.zeros_like(rank))
            is_cold = cold[target]
            for name, mask in (("cold", is_cold), ("warm", ~is_cold), ("all", torch.ones_like(is_cold))):
                out[name]["hit"] += float(hit[mask].sum())
                out[name]["ndcg"] += float(ndcg[mask].sum())
                out[name]["n"] += int(mask.sum())
    return {s: {"hit@10": v["hit"] / max(v["n"], 1), "ndcg@10": v["ndcg"] / max(v["n"], 1), "n": v["n"]}
            for s, v in out.items()}


def run_cell(cell_file, record, data_path):
    import torch

    from recbole_mm.compat import torch_load
    from recbole_mm.config import MMConfig
    from recbole_mm.data.lazy import data_preparation
    from recbole_mm.model.layers import ContentNeighbours, ContentRidge, cold_item_features
    from recbole_mm.quick_start import create_dataset
    from recbole_mm.registry import get_model

    cell = json.load(open(cell_file))
    cfg = dict(cell["config_dict"], data_path=data_path, show_progress=False, state="ERROR", record_runs=False)
    cfg.pop("record_path", None)
    cfg["checkpoint_dir"] = os.path.join("/tmp", "cold_rules_saved")
    config = MMConfig(model=cell["model"], dataset=cell["dataset"], config_file_list=cell["config_files"] or None,
                      config_dict=cfg, validate=False)
    dataset = create_dataset(config)
    train, _, test = data_preparation(config, dataset)
    model = get_model(cell["model"])(config, train._dataset)
    state = torch_load(record["checkpoint"], map_location="cpu")
    model.load_state_dict(state["state_dict"], strict=False)
    model.eval()
    cold = torch.as_tensor(train._dataset.cold_items)
    rules = _rules_of(model)
    if not rules:
        raise SystemExit(f"{cell['model']} has no cold-item rule (no IDs, or no cold items)")
    features = {}
    for rule in ("content_ridge", "content_knn"):  # the features each rule reads (ridge: + missing indicators)
        train._dataset.config["cold_item_rule"] = rule
        features[rule] = cold_item_features(train._dataset, get_model(cell["model"]).required_features(config))
    results = {}
    for label, rule, k in RULES:
        for r in rules:
            r._cache = {}
            if rule == "mean":
                r.content_map = None
            elif rule == "content_ridge":
                r.content_map = ContentRidge(features[rule], r.warm, r.cold)
            elif rule == "content_knn":
                r.content_map = ContentNeighbours(features[rule], r.warm, r.cold, k)
            else:
                r.content_map = _RandomWarm(r.warm, r.cold)
        results[label] = _evaluate(model, test, cold)
        if rule == "content_ridge":
            results[label]["fit"] = dict(rules[0].content_map.last)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="a finished study folder (records/ and saved checkpoints)")
    parser.add_argument("--data-path", default=os.path.join(ROOT, "dataset"))
    parser.add_argument("--models", nargs="+", default=["TSSR", "SICSRec"])
    parser.add_argument("--level", default="keep1", help="the sparsity level's folder (keep1), or '' without one")
    parser.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    found = {}
    for model in args.models:
        folder = os.path.join(args.study, "records", "*", model, args.level)
        for rec_file in sorted(glob.glob(os.path.join(folder, "seed*.json"))):
            if rec_file.endswith(".cell.json"):
                continue
            record = json.load(open(rec_file))
            if record.get("status") != "finished" or not record.get("checkpoint"):
                continue
            print(f"{model} {os.path.basename(rec_file)} ...", flush=True)
            found.setdefault(model, {})[record["seed"]] = {
                "recorded": {"cold": (record.get("test_item_sets") or {}).get("cold"),
                             "warm": (record.get("test_item_sets") or {}).get("warm")},
                "rules": run_cell(rec_file[:-len(".json")] + ".cell.json", record, args.data_path)}
    command = "OMP_NUM_THREADS=1 python benchmarks/cold_rules.py " + " ".join(
        [f"--study {args.study}", f"--data-path {args.data_path}", "--models " + " ".join(args.models),
         f"--level {args.level}", f"--out {args.out}"])
    with open(args.out + ".json", "w") as f:
        json.dump({"command": command, "results": found}, f, indent=2)

    lines = [f"`{command}`", "",
             "Test HR@10 / NDCG@10 per cold-item rule, the same weights for every rule (mean over seeds; n = seeds). "
             "Cold / warm: the users whose test target is a cold / warm item; all: every test user. Ties count half.",
             "", "| Model | rule | cold HR@10 | cold NDCG@10 | warm HR@10 | all HR@10 | all NDCG@10 | n |",
             "|---|---|---|---|---|---|---|---|"]
    for model, seeds in found.items():
        for label, _, _ in RULES:
            vals = [s["rules"][label] for s in seeds.values()]

            def mean(part, key):
                return statistics.mean(v[part][key] for v in vals)

            lines.append(f"| {model} | {label} | {mean('cold', 'hit@10'):.4f} | {mean('cold', 'ndcg@10'):.4f} | "
                         f"{mean('warm', 'hit@10'):.4f} | {mean('all', 'hit@10'):.4f} | {mean('all', 'ndcg@10'):.4f} "
                         f"| {len(vals)} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
