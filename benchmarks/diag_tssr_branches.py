"""How much does each TSSR Transformer branch contribute? A diagnostic for a trained checkpoint.

For every attention block (ID / content unimodal encoders, the two cross stacks) it reports the
learnt ReZero scale and the relative size of the scaled residual branches,
``||a * MHA(h)|| / ||h||`` and ``||a * FFN(h)|| / ||h||`` averaged over the valid positions of the
validation histories; then the validation metrics with each stack's attention branches switched
off (its output replaced by zeros), which shows whether the model uses the history at all through that stack.

    python benchmarks/diag_tssr_branches.py --checkpoint saved/TSSR-....pth \\
        --dataset=Bili_Food --data_path=dataset [any --key=value the run used]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    args, rest = parser.parse_known_args(argv)

    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_mm.compat import torch_load
    from recbole_mm.config import MMConfig
    from recbole_mm.model.layers import AttentionBlock
    from recbole_mm.quick_start import create_dataset
    from recbole_mm.registry import get_model, get_trainer

    ckpt = torch_load(args.checkpoint, map_location="cpu")
    overrides = {}
    for item in rest:  # --key=value, values parsed as RecBole does on its command line
        key, _, value = item.lstrip("-").partition("=")
        overrides[key] = value
    saved = ckpt["config"]
    config_dict = {k: saved[k] for k in ("MAX_ITEM_LIST_LENGTH", "hidden_size", "n_layers", "n_cross_layers",
                                         "n_heads", "inner_size", "classifier", "content_modality", "seed", "rezero",
                                         "rezero_init", "share_position_embedding", "text_feature")
                   if k in saved.final_config_dict}
    config_dict.update({"use_gpu": False, "show_progress": False, "eval_batch_size": 4096})
    config_dict.update(overrides)
    config = MMConfig(model="TSSR", dataset=config_dict.get("dataset", saved["dataset"]), config_dict=config_dict)
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    _train, valid, _test = data_preparation(config, dataset)
    model = get_model("TSSR")(config, _train._dataset)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    trainer = get_trainer(config["MODEL_TYPE"], "TSSR")(config, model)

    stats, current = {}, {}
    # the histories of the batch being scored: the ID embedding lookup of forward() sees them first
    model.item_embedding.register_forward_pre_hook(
        lambda mod, inputs: current.__setitem__("valid", inputs[0] > 0) if inputs[0].dim() == 2 else None)

    def hook(name):
        def fn(block, inputs, output):
            h, mask = inputs[0], inputs[1]
            kv = inputs[2] if len(inputs) > 2 and inputs[2] is not None else h
            a1 = block.scale_attn(block.attn(h, kv, mask))
            h1 = block.ln1(h + a1)
            a2 = block.scale_ffn(block.ffn(h1))
            seq_valid = current["valid"]
            valid_rows = seq_valid if seq_valid.shape == h.shape[:2] else torch.ones_like(h[..., 0], dtype=torch.bool)
            r1 = (a1.norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12))[valid_rows].mean()
            r2 = (a2.norm(dim=-1) / h1.norm(dim=-1).clamp_min(1e-12))[valid_rows].mean()
            s = stats.setdefault(name, [0.0, 0.0, 0])
            s[0] += float(r1)
            s[1] += float(r2)
            s[2] += 1
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, AttentionBlock)]
    base = trainer.evaluate(valid, load_best_model=False)
    for h in handles:
        h.remove()
    print("block | a_attn | a_ffn | ||a*MHA(h)||/||h|| | ||a*FFN(h)||/||h||")
    for name, m in model.named_modules():
        if isinstance(m, AttentionBlock):
            r1, r2, n = stats[name]
            a1 = float("nan") if m.scale_attn.alpha is None else float(m.scale_attn.alpha.detach())
            a2 = float("nan") if m.scale_ffn.alpha is None else float(m.scale_ffn.alpha.detach())
            print(f"{name} | {a1:+.4f} | {a2:+.4f} | "
                  f"{r1 / n:.3f} | {r2 / n:.3f}")
    print(f"valid, as trained: {dict(base)}")
    stacks = ("id_encoder", "content_encoder", "cross_id", "cross_content")
    for off in [(s,) for s in stacks] + [stacks]:
        # the attention sublayers of these stacks output zeros: h <- LN(h + 0), the FFN still runs
        silenced = [m.attn.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
                    for s in off for m in getattr(model, s).layers]
        result = trainer.evaluate(valid, load_best_model=False)
        for h in silenced:
            h.remove()
        name = off[0] if len(off) == 1 else "every"
        print(f"valid, {name} attention off: {dict(result)}")


if __name__ == "__main__":
    main()
