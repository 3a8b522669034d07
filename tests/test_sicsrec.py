"""SICSRec stage 2: step 2 starts exactly at step 1, frozen parameters stay frozen,
strict step-1 loading, the bug-fix switches (decoder chaining, duplicate mask, scoring), causality,
and an end-to-end run (stage 1 + both steps) whose second run reuses stage 1 and step 1."""

import copy
import glob
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from recbole.data import data_preparation  # noqa: E402
from recbole.data.interaction import Interaction  # noqa: E402
from recbole.model.sequential_recommender.sasrec import SASRec  # noqa: E402

import recbole_mm  # noqa: E402
from recbole_mm.config import MMConfig  # noqa: E402
from recbole_mm.model.sicsrec import ID_ENCODER_PREFIXES, SICSRec, SICSRecTrainer, step1_config  # noqa: E402
from recbole_mm.quick_start import create_dataset  # noqa: E402
from recbole_mm.registry import get_trainer  # noqa: E402

from conftest import FAST, REPO, write_tiny_dataset  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Config, dataset and loaders for SICSRec on a tiny dataset (raw text features, stage 1 off)."""
    root = tmp_path_factory.mktemp("sicsrec")
    old, argv = os.getcwd(), sys.argv
    os.chdir(root)
    sys.argv = ["pytest"]
    try:
        write_tiny_dataset(root / "data", n_users=40, n_items=30)
        cfg = dict(FAST, data_path=str(root / "data"), checkpoint_dir=str(root / "saved"), stage1=False,
                   n_layers=2, n_heads=2)
        config = MMConfig(model="SICSRec", dataset="tiny", config_dict=cfg)
        dataset = create_dataset(config)
        train, valid, test = data_preparation(config, dataset)
    finally:
        os.chdir(old)
        sys.argv = argv
    return config, dataset, train, valid


def make(built, **overrides):
    config = copy.deepcopy(built[0])
    for k, v in overrides.items():
        config[k] = v
    torch.manual_seed(0)
    return SICSRec(config, built[2]._dataset)


def step1_model(built):
    """A SASRec (step 1) with non-trivial weights: a few Adam steps on the tiny data."""
    config, _, train, _ = built
    torch.manual_seed(1)
    sas = SASRec(step1_config(config), train._dataset)
    opt = torch.optim.Adam(sas.parameters(), lr=1e-2)
    for _, inter in zip(range(3), train):
        opt.zero_grad()
        sas.calculate_loss(inter).backward()
        opt.step()
    return sas


def first_batch(built):
    return next(iter(built[2]))


def test_step2_starts_exactly_at_step1(built):
    sas = step1_model(built)
    model = make(built)
    model.load_id_encoder(sas.state_dict())
    for adapters in (model.adapter_attn, model.adapter_ffn):
        assert all(not a.up.weight.detach().any() for a in adapters)  # zero-initialised
    sas.eval()
    model.eval()
    inter = first_batch(built)
    seq, length = inter["item_id_list"], inter["item_length"]
    with torch.no_grad():
        ref = sas(seq, length)
        ours = model.id_encoder_states(seq)[torch.arange(seq.size(0)), length - 1]
    assert torch.equal(ref, ours)
    for k, v in sas.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_frozen_parameters_get_no_gradient_and_never_change(built):
    config, _, train, _ = built
    sas = step1_model(built)
    model = make(built)
    model.load_id_encoder(sas.state_dict())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("trm_encoder.")}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("adapter_attn.") for n in trainable) and any(n.startswith("adapter_ffn.") for n in trainable)
    assert "item_embedding.weight" in trainable and "content_tables.text.weight" in trainable

    model.train()
    sum(model.calculate_loss(first_batch(built))).backward()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None, n
    assert all(float(model.adapter_ffn[i].up.weight.grad.abs().sum()) > 0 for i in range(2))
    model.zero_grad(set_to_none=True)

    # two epochs of the real step-2 loop (RecBole's, through the SICSRec trainer's optimizer)
    trainer = get_trainer(config["MODEL_TYPE"], "SICSRec")(config, model)
    assert isinstance(trainer, SICSRecTrainer)
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for n, p in model.named_parameters() if n in frozen)
    for epoch in range(2):
        trainer._train_epoch(train, epoch)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"frozen parameter changed: {n}"
            assert p.grad is None, n
    changed = [n for n, v in trainable.items() if not torch.equal(v, dict(model.named_parameters())[n].detach())]
    assert any(n.startswith("adapter_") for n in changed) and "item_embedding.weight" in changed
    assert any(n.startswith("decoder.") for n in changed) and "fusion.weight" in changed


def test_step1_loading_is_strict(built):
    model = make(built)
    state = step1_model(built).state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("trm_encoder.layer.1.")}
    with pytest.raises(ValueError, match="missing keys"):
        model.load_id_encoder(missing)
    wrong = dict(state)
    wrong["position_embedding.weight"] = torch.zeros(7, 16)
    with pytest.raises(ValueError, match="shape mismatches"):
        model.load_id_encoder(wrong)
    model.load_id_encoder({"state_dict": state, "epoch": 3})  # a RecBole checkpoint dict works too


def test_adapter_positions_faithful_switch(built):
    model = make(built, adapter_positions=["attn"])
    assert model.adapter_ffn is None and len(model.adapter_attn) == 2


def test_decoder_chaining_switch(built):
    chained = make(built)
    faithful = make(built, decoder_chain_layers=False)
    faithful.load_state_dict(chained.state_dict())
    chained.eval()
    faithful.eval()
    h_id, h_c = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    mask = torch.ones(3, 1, 5, 5, dtype=torch.bool).tril()
    with torch.no_grad():
        a = chained.decode(h_id, h_c, mask)
        b = faithful.decode(h_id, h_c, mask)
        q = chained.decoder_q_LayerNorm(h_id)
        kv = chained.decoder_kv_LayerNorm(h_c)
        l0, l1 = chained.decoder.layers
        torch.testing.assert_close(a, l1(l0(q, mask, kv), mask, kv))
        torch.testing.assert_close(b, l1(q, mask, kv))  # official: only the last layer, on the original Q
    assert not torch.allclose(a, b)


def test_last_position_decoding_equals_full_decoding(built):
    model = make(built)
    model.eval()
    inter = first_batch(built)
    with torch.no_grad():
        fast = model(inter["item_id_list"], inter["item_length"])
        full = model(inter["item_id_list"], inter["item_length"], all_positions=True)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_cacl_duplicate_mask(built):
    model = make(built)
    s = F.normalize(torch.randn(4, 16), dim=-1)
    target = torch.tensor([3, 5, 3, 8])
    c = model.item_content(target)
    logits = s @ c.t() / model.tau
    rows = []
    for b in range(4):
        keep = [j for j in range(4) if j == b or target[j] != target[b]]
        rows.append(torch.logsumexp(logits[b, keep], 0) - logits[b, b])
    torch.testing.assert_close(model.cacl_loss(s, target), torch.stack(rows).mean())
    model.cacl_duplicate_mask = "zero"  # official: duplicates become logit 0, still in the denominator
    zero = logits.clone()
    zero[0, 2] = zero[2, 0] = 0.0
    torch.testing.assert_close(model.cacl_loss(s, target), F.cross_entropy(zero, torch.arange(4)))


def test_train_and_test_score_items_the_same_way(built):
    model = make(built, item_dropout_prob=0.0)
    inter = first_batch(built)
    model.eval()
    with torch.no_grad():
        s = model(inter["item_id_list"], inter["item_length"])
        scores = model.full_sort_predict(inter)
        e = F.normalize(model.item_embedding.weight, dim=-1)
        torch.testing.assert_close(scores, s @ e.t() / model.tau)
        # the training loss is the CE of exactly these logits (dropout off)
        torch.testing.assert_close(F.cross_entropy(scores, inter["item_id"]), model.calculate_loss(inter)[0])
        one = model.predict(Interaction({"item_id_list": inter["item_id_list"], "item_length": inter["item_length"],
                                         "item_id": inter["item_id"]}))
        torch.testing.assert_close(one, scores.gather(1, inter["item_id"][:, None])[:, 0])
    raw = make(built, predict_normalize_items=False)
    raw.eval()
    with torch.no_grad():
        torch.testing.assert_close(raw.full_sort_predict(inter), raw(inter["item_id_list"], inter["item_length"])
                                   @ raw.item_embedding.weight.t())


def test_no_future_leakage_and_padding_invariance(built):
    model = make(built)
    model.eval()
    inter = first_batch(built)
    seq, length = inter["item_id_list"], inter["item_length"]
    keep = length >= 3
    seq, length = seq[keep][:8], length[keep][:8]
    with torch.no_grad():
        base = model.full_sort_predict(Interaction({"item_id_list": seq, "item_length": length}))
        junk = seq.clone()
        for b in range(junk.size(0)):
            junk[b, int(length[b]):] = 7  # garbage after the end of the sequence
        s1 = model.full_sort_predict(Interaction({"item_id_list": junk, "item_length": length}))
        # a prefix sees nothing of the items after it
        short = length - 1
        cut = seq.clone()
        for b in range(cut.size(0)):
            cut[b, int(short[b]):] = 0
        p1 = model.full_sort_predict(Interaction({"item_id_list": seq, "item_length": short}))
        p2 = model.full_sort_predict(Interaction({"item_id_list": cut, "item_length": short}))
    torch.testing.assert_close(base, s1, rtol=0, atol=1e-5)
    torch.testing.assert_close(p1, p2, rtol=0, atol=1e-5)


def test_reg_loss_norms(built):
    model = make(built)
    e, t = model.item_embedding.weight, model.content_tables["text"].weight
    torch.testing.assert_close(model.reg_loss(), e.norm() + t.norm())
    model.reg_norm = "squared"
    torch.testing.assert_close(model.reg_loss(), e.pow(2).sum() + t.pow(2).sum())
    frozen = make(built, content_tables_trainable=False)
    assert not frozen.content_tables["text"].weight.requires_grad
    torch.testing.assert_close(frozen.reg_loss(), frozen.item_embedding.weight.norm())


def test_end_to_end_stage1_both_steps_and_reuse(workdir):
    """One call runs stage 1 (cooccurrence pairs + SFT + export), step 1 and step 2; the second
    run (the CLI) reuses the stage-1 features and the step-1 checkpoint and gives the same result."""
    write_tiny_dataset(workdir / "data")
    cfg = dict(FAST, data_path=str(workdir / "data"), checkpoint_dir=str(workdir / "saved"), epochs=2,
               sft_epochs=1, sft_max_length=16, sft_batch_size=16)
    first = recbole_mm.run_recbole_mm(model="SICSRec", dataset="tiny", config_dict=cfg)
    step1 = glob.glob(str(workdir / "saved" / "SICSRec-step1-tiny-*.pth"))
    assert len(step1) == 1
    mtime = os.path.getmtime(step1[0])
    features = workdir / "data" / "tiny" / "tiny.text_sicsrec.npy"
    features_mtime = os.path.getmtime(features)
    first_record = json.load(open(first["record_path"]))
    ckpt = torch.load(step1[0], weights_only=False)
    assert ckpt["config"]["model"] == "SASRec" and "sicsrec_step1" in ckpt
    assert all(k.startswith(ID_ENCODER_PREFIXES) for k in ckpt["state_dict"])

    args = [f"--{k}={v}" for k, v in cfg.items()] + ["--model=SICSRec", "--dataset=tiny"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_recbole_mm.py")] + args, capture_output=True,
                          text=True, timeout=300, cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.load(open(proc.stdout.split("record: ")[-1].strip()))
    assert record["history"]["step1"]["reused"] is True and record["history"]["step1"]["checkpoint"] == step1[0]
    assert first_record["history"]["step1"]["reused"] is False
    assert os.path.getmtime(step1[0]) == mtime
    assert os.path.getmtime(features) == features_mtime  # stage 1 reused too
    ndcg = float(proc.stdout.split("ndcg@10: ")[-1].split()[0])
    assert abs(ndcg - float(first["test_result"]["ndcg@10"])) < 1e-4  # step 2 is the same either way
    # the step-1 SASRec is also tested on the same split (the paired ID-only baseline) and recorded,
    # through the trainer's protocol hooks (extra_test_results, stage_summaries)
    s1 = first["extra_test_results"]["step1"]
    assert set(s1) >= {"ndcg@10", "hit@10"} and 0.0 <= float(s1["ndcg@10"]) <= 1.0
    assert first_record["history"]["step1"]["test_result"] == {k: float(v) for k, v in s1.items()}
    stage = first_record["stages"][0]
    assert (stage["name"], stage["model"], stage["epochs"], stage["max_epochs"], stage["reused"]) == \
        ("step1", "SASRec", 2, 2, False)
    assert stage["test_result"] == first_record["history"]["step1"]["test_result"]
    assert record["stages"][0]["reused"] is True
    reused = record["history"]["step1"]["test_result"]
    assert all(abs(reused[k] - float(v)) < 1e-6 for k, v in s1.items())  # same checkpoint, same numbers



def test_content_spread_diagnostic(built):
    model = make(built)
    model.eval()
    with torch.no_grad():
        c = model.item_content(torch.arange(1, model.n_items))
        sim = c @ c.t()
        n = c.size(0)
        brute = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
    assert abs(model.content_spread(batch_size=7) - brute) < 1e-5


def test_a_sasrec_run_published_in_the_share_folder_is_reused_as_step1(workdir):
    """In a study, a SASRec cell publishes its best checkpoint under its step-1 key into the study's
    ``share_dir`` (SICSRec's ModelSpec.publishers); the SICSRec cell of the same data, seed and step-1
    settings loads it instead of training step 1 and gets exactly the result it gets when it trains
    step 1 itself. Another seed is another key: not reused."""
    write_tiny_dataset(workdir / "data")
    base = dict(FAST, data_path=str(workdir / "data"), epochs=2)
    sics = dict(stage1=False)
    own = recbole_mm.run_recbole_mm(model="SICSRec", dataset="tiny",
                                    config_dict=dict(base, **sics, checkpoint_dir=str(workdir / "own")))
    assert json.load(open(own["record_path"]))["history"]["step1"]["reused"] is False

    share = workdir / "share"
    base["share_dir"] = str(share)
    sas = recbole_mm.run_recbole_mm(model="SASRec", dataset="tiny", config_dict=dict(base, checkpoint_dir=str(workdir / "sas")))
    published = glob.glob(str(share / "step1" / "SICSRec-step1-tiny-*.pth"))
    assert len(published) == 1 and json.load(open(sas["record_path"]))["published"] == {"SICSRec": published[0]}
    other_seed = recbole_mm.run_recbole_mm(model="SASRec", dataset="tiny",
                                           config_dict=dict(base, seed=8, checkpoint_dir=str(workdir / "sas8")))
    assert len(glob.glob(str(share / "step1" / "SICSRec-step1-tiny-*.pth"))) == 2 and other_seed["published"]["SICSRec"]

    sic = recbole_mm.run_recbole_mm(model="SICSRec", dataset="tiny",
                                    config_dict=dict(base, **sics, checkpoint_dir=str(workdir / "sic")))
    step1 = json.load(open(sic["record_path"]))["history"]["step1"]
    assert step1["reused"] is True and step1["checkpoint"] == published[0] and "share_dir" in step1["source"]
    assert step1["history"]["train_loss"] == json.load(open(sas["record_path"]))["history"]["train_loss"]
    assert not glob.glob(str(workdir / "sic" / "SICSRec-step1-*"))  # step 1 was not trained again
    # the same numbers as when SICSRec trains its own step 1; its step 1 is that SASRec run
    for k, v in own["test_result"].items():
        assert abs(float(sic["test_result"][k]) - float(v)) < 1e-6, k
    for k, v in sas["test_result"].items():
        assert abs(float(sic["extra_test_results"]["step1"][k]) - float(v)) < 1e-6, k


def test_step1_key_covers_length_bucketing(built):
    """A step 1 trained on length-bucketed batches is not offered to runs without bucketing (and the
    key of runs without it is unchanged by the bucketing keys)."""
    from recbole_mm.model.sicsrec import BUCKETING_KEYS, step1_key

    config, _, train, valid = built
    plain = step1_key(config, train, valid)
    assert not set(BUCKETING_KEYS) & set(plain["settings"])
    bucketed = copy.deepcopy(config)
    bucketed["length_bucketing"] = True
    key = step1_key(bucketed, train, valid)
    assert key["settings"]["length_bucketing"] is True and key != plain
