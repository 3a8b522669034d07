"""SICSRec stage 1: pair mining never looks past the last training item, the LLM miner
(tiny random causal LM, malformed answers, resume), robust answer parsing, pair files, and the
alignment fine-tuning + export with the offline text encoder and a tiny ViT on real photos."""

import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from recbole_mm.config import MMConfig  # noqa: E402
from recbole_mm.data.features import FeatureStore  # noqa: E402
from recbole_mm.model import sicsrec_pairs as sp  # noqa: E402
from recbole_mm.model import sicsrec_stage1 as s1  # noqa: E402
from recbole_mm.quick_start import create_dataset  # noqa: E402

from conftest import FAST, write_tiny_dataset  # noqa: E402

SK_IMAGES = os.path.join(os.path.dirname(__import__("sklearn").__file__), "datasets", "images")


def _dataset(root, name="tiny", **overrides):
    """A SICSRec dataset object before build() (what stage 1 sees), with cwd/argv isolated."""
    old, argv = os.getcwd(), sys.argv
    os.chdir(root)
    sys.argv = ["pytest"]
    try:
        cfg = dict(FAST, data_path=str(root / "data"), checkpoint_dir=str(root / "saved"))
        cfg.update(overrides)
        config = MMConfig(model="SICSRec", dataset=name, config_dict=cfg)
        return create_dataset(config)
    finally:
        os.chdir(old)
        sys.argv = argv


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Tiny dataset, raw text features only (stage 1 off), shared by the read-only tests."""
    root = tmp_path_factory.mktemp("sics1")
    write_tiny_dataset(root / "data", n_users=40, n_items=30)
    return root, _dataset(root, stage1=False)


def _raw_sequences(folder, name="tiny"):
    df = pd.read_csv(os.path.join(folder, f"{name}.inter"), sep="\t", dtype=str)
    df.columns = [c.split(":")[0] for c in df.columns]
    df["timestamp"] = df["timestamp"].astype(float)
    df = df.sort_values(["user_id", "timestamp"], kind="mergesort")
    return {u: g["item_id"].tolist() for u, g in df.groupby("user_id")}


# ----------------------------------------------------------------------------- sequences and pairs


def test_user_sequences_are_recbole_leave_one_out(plain):
    root, ds = plain
    raw = _raw_sequences(root / "data" / "tiny")
    id2token = ds.field2id_token[ds.iid_field]
    seqs = sp.user_sequences(ds)
    assert len(seqs) == len(raw) == 40
    for s in seqs:
        tokens = [id2token[i] for i in s.items]
        assert tokens == raw[s.user]
        assert s.n_train == len(tokens) - 2  # last two = validation and test targets


def test_pair_miner_never_uses_an_item_after_the_last_training_item(plain):
    root, ds = plain
    seqs = sp.user_sequences(ds)
    n_items = ds.item_num
    rng = np.random.default_rng(0)
    for s in seqs:
        train, valid_item, test_item = s.items[: s.n_train], s.items[-2], s.items[-1]
        target, cands = sp.pair_query(s, "train_last", True, 50)
        assert target == train[-1]
        assert set(cands) <= set(train[:-1]) and valid_item not in cands and test_item not in cands
        # adversarial vectors: the validation and test items are identical to the target
        vec = rng.normal(size=(n_items, 8)).astype(np.float32)
        vec[valid_item] = vec[target]
        vec[test_item] = vec[target]
        pairs, _ = sp.mine_cooccurrence([(s.user, target, cands)], vec)
        assert pairs and pairs[0][1] == target and pairs[0][2] in train[:-1]
    # the official behaviour stays reachable: its target is the test item (a leak)
    t_full, c_full = sp.pair_query(seqs[0], "full_last", True, 50)
    assert t_full == seqs[0].items[-1] and seqs[0].items[-2] in c_full


def test_stage1_pairs_from_the_dataset_respect_the_split(plain):
    root, ds = plain
    pairs, info = s1.stage1_pairs(ds)
    assert info["source"] == "cooccurrence" and info["pairs"] == len(pairs) > 0
    by_target = {}
    for s in sp.user_sequences(ds):
        by_target.setdefault(s.items[s.n_train - 1], []).append(set(s.items[: s.n_train - 1]))
    for a, b in pairs.tolist():
        assert a != b  # self-pairs dropped
        assert any(b in prefix for prefix in by_target[a])  # similar item from a user's training prefix
    assert os.path.isfile(root / "data" / "tiny" / "tiny.sicsrec_pairs.cooccurrence.tsv")


def test_pair_file_is_read_and_unknown_items_dropped(plain, tmp_path):
    root, ds = plain
    path = tmp_path / "item_pairs_id.txt"
    path.write_text("i3,i4\ni5,i5\ni7,nope\ni9,i2\n")  # the official header-less format
    ds.config["pair_file"] = str(path)
    try:
        pairs, info = s1.stage1_pairs(ds)
    finally:
        ds.config["pair_file"] = None
    tok = ds.field2id_token[ds.iid_field]
    assert [(tok[a], tok[b]) for a, b in pairs.tolist()] == [("i3", "i4"), ("i9", "i2")]
    assert info["unknown_items"] == 1


# ----------------------------------------------------------------------------- prompts and parsing

CANDS = [("12", "Spicy hot pot at home"), ("7", "Fried milk"), ("305", "Tofu noodles challenge")]


@pytest.mark.parametrize("answer,expected", [
    ("7-Fried milk", ("7", "ok")),
    ("  Answer: 305-Tofu noodles challenge", ("305", "ok")),
    ("The most similar is 12-Spicy hot pot at home, not 7.", ("12", "ok")),
    ("-1", (None, "none")),
    ("−1 (none is similar)", (None, "none")),
    ("None of them", (None, "none")),
    ("Fried milk", ("7", "title")),
    ("999-Unknown video", (None, "illegal")),
    ("", (None, "illegal")),
    ("##ing [unused3] ., 的", (None, "illegal")),
    ("3050-x", (None, "illegal")),  # a longer number is not candidate 305
    (None, (None, "illegal")),
])
def test_parse_answer(answer, expected):
    assert sp.parse_answer(answer, CANDS) == expected


def test_prompt_alignment_and_the_faithful_misalignment():
    cands = [("30", "thirty"), ("4", "four"), ("100", "hundred")]  # chronological order
    aligned = sp.build_prompt(("9", "nine"), cands, aligned=True)
    assert "30-thirty" in aligned and "4-four" in aligned and "100-hundred" in aligned
    broken = sp.build_prompt(("9", "nine"), cands, aligned=False)
    # official bug: chronological ids zipped with titles in ascending-id order (4, 30, 100)
    assert "30-four" in broken and "4-thirty" in broken and "100-hundred" in broken


# ----------------------------------------------------------------------------- the LLM miner


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random 2-layer GPT-2 (dim 32) with MiniLM's tokenizer and a chat template, saved offline."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from recbole_mm.data.extract import default_text_encoder

    folder = tmp_path_factory.mktemp("tiny_lm")
    tok = AutoTokenizer.from_pretrained(default_text_encoder())
    tok.chat_template = "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}assistant:"
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=1024,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_llm_miner_end_to_end_with_a_tiny_causal_lm(plain, tiny_lm, tmp_path):
    root, ds = plain
    config = ds.config
    old = {k: config[k] for k in ("pair_miner", "pair_llm", "pair_llm_chunk_size", "pair_llm_max_new_tokens")}
    config["pair_miner"], config["pair_llm"] = "llm", tiny_lm
    config["pair_llm_chunk_size"], config["pair_llm_max_new_tokens"] = 16, 6
    try:
        pairs, info = s1.stage1_pairs(ds)  # 40 users, 3 chunks, random (malformed) answers
        assert info["queries"] == 40
        assert sum(info[k] for k in ("ok", "title", "none", "illegal")) == 40
        assert len(pairs) == info["ok"] + info["title"]  # candidates never include the target
        out = root / "data" / "tiny" / "tiny.sicsrec_pairs.llm.tsv"
        assert out.is_file() and (root / "data" / "tiny" / "tiny.sicsrec_pairs.llm.answers.tsv").is_file()
        assert not (root / "data" / "tiny" / ".tiny.sicsrec_pairs.llm.chunks").exists()
        again, info2 = s1.stage1_pairs(ds)  # the finished pair file is reused, no generation
        assert info2.get("reused") and torch.equal(again, pairs)
    finally:
        for k, v in old.items():
            config[k] = v

    # resume: finished chunks are reused after an interruption, only missing chunks regenerate
    miner = sp.LLMPairMiner(tiny_lm, batch_size=4, max_new_tokens=4, device="cpu")
    assert miner.chat  # the tokenizer's chat template is used
    id2token = ds.field2id_token[ds.iid_field]
    queries = []
    for s in sp.user_sequences(ds)[:10]:
        t, cs = sp.pair_query(s)
        queries.append((s.user, id2token[t], [id2token[c] for c in cs]))
    titles = {str(t): f"title of {t}" for t in id2token}
    calls = []
    real = miner.generate
    miner.generate = lambda prompts: calls.append(len(prompts)) or real(prompts)
    chunks = tmp_path / "chunks"
    first, stats = miner.mine(queries, titles, chunk_dir=str(chunks), chunk_size=4, show_progress=False)
    assert calls == [4, 4, 2] and stats["reused_chunks"] == 0
    os.remove(chunks / "chunk_000001.json")
    calls.clear()
    second, stats = miner.mine(queries, titles, chunk_dir=str(chunks), chunk_size=4, show_progress=False)
    assert calls == [4] and stats["reused_chunks"] == 2
    assert [r[:4] for r in first] == [r[:4] for r in second]
    for user, target, similar, status, answer in first:
        assert status in sp.ANSWER_STATUSES and isinstance(answer, str)
        assert similar is None or similar in dict((q[0], q[2]) for q in queries)[user]


# ----------------------------------------------------------------------------- alignment fine-tuning


def _with_photos(root, with_item=True):
    folder = write_tiny_dataset(root / "data", n_users=30, n_items=20, with_item=with_item)
    img = os.path.join(folder, "images")
    os.makedirs(img, exist_ok=True)
    photos = [os.path.join(SK_IMAGES, f) for f in ("china.jpg", "flower.jpg")]
    for i in range(1, 19):  # items 19 and 20 have no image
        shutil.copy(photos[i % 2], os.path.join(img, f"i{i}.jpg"))
    with open(os.path.join(img, "i18.jpg"), "wb") as f:
        f.write(b"not a jpeg")  # corrupt: treated as image-less
    return folder


def _image_spec(vit):
    return {"type": "image", "encoder": vit, "image_dir": "images", "batch_size": 8}


SFT_FAST = dict(sft_epochs=2, sft_batch_size=16, sft_max_length=16, sft_proj_hidden=16, sft_proj_dim=8,
                sft_learning_rate=1e-2)


def test_sft_text_and_image_on_real_photos(tmp_path, tiny_vit):
    _with_photos(tmp_path)
    mm = {"text": {"type": "text", "fields": ["title"], "template": "{title}"}, "image": _image_spec(tiny_vit)}
    ds = _dataset(tmp_path, stage1=False, content_modality="both", mm_features=mm, **SFT_FAST)
    config = ds.config
    pairs, _ = s1.stage1_pairs(ds)
    inputs = s1.stage1_inputs(ds, ["text", "image"])
    torch.manual_seed(0)
    aligner = s1.build_aligner(ds, inputs)
    vit = aligner.image.model
    text = aligner.text.encoder
    before = {("img", k): v.clone() for k, v in vit.state_dict().items()}
    before.update({("txt", k): v.clone() for k, v in text.state_dict().items()})
    heads = {k: v.clone() for k, v in aligner.text_head.state_dict().items()}
    valid = {m: inputs[m]["valid"] for m in inputs}
    history = s1.train_alignment(aligner, pairs, valid, config, torch.device("cpu"))
    assert len(history) == 2 and set(history[0]) == {"t2t", "i2i", "t2i"}
    assert all(np.isfinite(v) for row in history for v in row.values())
    # top-k trainable: the last ViT block / text layer changed, embeddings and lower blocks did not
    after = {("img", k): v for k, v in vit.state_dict().items()}
    after.update({("txt", k): v for k, v in text.state_dict().items()})
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k[0] == "img" and ".1." in k[1] for k in changed)
    assert not any(k[0] == "img" and (".0." in k[1] or "embeddings" in k[1]) for k in changed)
    n_txt = len(text.encoder.layer)
    assert any(k[0] == "txt" and f"layer.{n_txt - 1}." in k[1] for k in changed)
    assert not any(k[0] == "txt" and (f"layer.{n_txt - 1}." not in k[1]) for k in changed)
    assert any(not torch.equal(v, aligner.text_head.state_dict()[k]) for k, v in heads.items())  # heads trained (S4)
    assert not aligner.image.valid[ds.token2id(ds.iid_field, "i18")]  # the corrupt photo was found

    # the whole stage: exported into the feature store under their own names, reused next time
    out = s1.run_stage1(ds)
    store = FeatureStore(config["data_path"], "tiny")
    assert set(out) == {"text_sicsrec", "image_sicsrec"}
    assert out["text_sicsrec"].matrix.shape == (20, 384) and out["image_sicsrec"].matrix.shape == (20, 32)
    man = store.read_manifest("image_sicsrec")
    assert set(man["missing"]) == {"i18", "i19", "i20"} and man["sft_history"][0].keys() >= {"i2i", "t2i"}
    mtime = os.path.getmtime(store.paths("text_sicsrec")[0])
    s1.run_stage1(ds)
    assert os.path.getmtime(store.paths("text_sicsrec")[0]) == mtime


def test_sft_image_only_dataset(tmp_path, tiny_vit):
    _with_photos(tmp_path, with_item=False)  # no .item file: images only
    ds = _dataset(tmp_path, stage1=True, content_modality="image", mm_features={"image": _image_spec(tiny_vit)},
                  **SFT_FAST)
    assert list(ds.mm_features) == ["image_sicsrec"]
    table = ds.mm_features["image_sicsrec"]
    assert table.shape == (21, 32) and bool(ds.mm_missing["image_sicsrec"][0])
    man = FeatureStore(ds.config["data_path"], "tiny").read_manifest("image_sicsrec")
    assert man["pairs"]["feature"] == "image" and set(man["sft_history"][0]) == {"i2i"}


def test_sft_losses_follow_the_switches():
    torch.manual_seed(0)
    a, p = torch.randn(4, 8), torch.randn(4, 8)
    ids_a, ids_p = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 5, 7])
    # faithful: raw dot products, self term and duplicates in the denominator
    logits = torch.cat([a @ p.t(), a @ a.t()], 1) / 0.05
    ref = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    got = s1.pair_infonce(a, p, ids_a, ids_p, 0.05, normalize=False, mask_self=False, mask_duplicates=False)
    torch.testing.assert_close(got, ref)
    # fix: row 0's positive is item 5, so p_2 (also item 5) is not a negative; a_0.a_0 is gone
    an, pn = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    ap, aa = an @ pn.t() / 0.05, an @ an.t() / 0.05
    row0 = torch.cat([ap[0, [0, 1, 3]], aa[0, [1, 2, 3]]])
    fixed = s1.pair_infonce(a, p, ids_a, ids_p, 0.05)
    rows = []
    for i in range(4):
        keep_p = [j for j in range(4) if j == i or (ids_p[j] != ids_p[i] and ids_p[j] != ids_a[i])]
        keep_a = [j for j in range(4) if j != i and ids_a[j] != ids_p[i] and ids_a[j] != ids_a[i]]
        r = torch.cat([ap[i, keep_p], aa[i, keep_a]])
        rows.append(torch.logsumexp(r, 0) - ap[i, i])
    torch.testing.assert_close(fixed, torch.stack(rows).mean())
    assert torch.isclose(rows[0], torch.logsumexp(row0, 0) - ap[0, 0])


def test_stage1_is_shared_by_seeds_unless_sft_seed_is_unset():
    """A fixed sft_seed (default) makes stage 1 per-dataset preprocessing: runs with other seeds
    use the same tables; sft_seed: ~ gives every run seed its own, under its own name."""
    from recbole_mm.model.sicsrec_stage1 import sft_seed, stage1_feature_names

    shared = [{"seed": s, "sft_seed": 2020, "content_modality": "text"} for s in (2020, 2021)]
    assert {sft_seed(c) for c in shared} == {2020}
    assert stage1_feature_names(shared[0]) == stage1_feature_names(shared[1]) == {"text": "text_sicsrec"}
    own = [{"seed": s, "sft_seed": None, "content_modality": "both"} for s in (2020, 2021)]
    assert [sft_seed(c) for c in own] == [2020, 2021]
    assert stage1_feature_names(own[1]) == {"text": "text_sicsrec_seed2021", "image": "image_sicsrec_seed2021"}
