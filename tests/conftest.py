"""Shared fixtures: tiny datasets in RecBole's atomic format, written into tmp folders."""

import contextlib
import os
import sys

# One torch thread per process: the suite starts subprocesses (CLI runs, DDP ranks, study cells)
# and two threads on two busy cores run several times slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import recbole_mm  # noqa: F401 - compat first

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = (
    "red blue green small large fast slow bright dark soft hard sweet sour spicy fresh "
    "classic modern wild calm loud tiny giant happy sad golden silver"
).split()


def write_tiny_dataset(root, name="tiny", n_users=40, n_items=30, min_len=5, max_len=12,
                       seed=0, with_item=True, extra_items=0):
    """Write ``<root>/<name>/<name>.inter`` (+ ``.item``) and return the dataset folder.

    Sequences follow a simple pattern (item i tends to be followed by item i+1) so that a
    model can learn something in a few epochs. ``extra_items`` adds items to ``.item`` that
    never occur in ``.inter``.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(1, n_users + 1):
        length = int(rng.integers(min_len, max_len + 1))
        start = int(rng.integers(1, n_items + 1))
        items = [((start + k - 1) % n_items) + 1 for k in range(length)]
        for t, item in enumerate(items):
            lines.append(f"u{u}\ti{item}\t{1000 * u + t}")
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if with_item:
        rows = ["item_id:token\ttitle:token_seq\tgenre:token_seq"]
        for i in range(1, n_items + 1 + extra_items):
            words = " ".join(rng.choice(WORDS, size=3))
            rows.append(f"i{i}\titem {i} {words}\tgenre{i % 4}")
        with open(os.path.join(folder, f"{name}.item"), "w") as f:
            f.write("\n".join(rows) + "\n")
    return folder


FAST = {
    "epochs": 1,
    "hidden_size": 16,
    "inner_size": 32,
    "n_layers": 1,
    "n_heads": 1,
    "train_batch_size": 64,
    "eval_batch_size": 64,
    "MAX_ITEM_LIST_LENGTH": 10,
    "show_progress": False,
    "state": "ERROR",
    "use_gpu": False,
    "seed": 7,
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run inside a temporary folder (RecBole writes log/, log_tensorboard/, saved/ to cwd)
    with a clean command line (RecBole's Config reads --key=value from sys.argv)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    return tmp_path


@pytest.fixture
def tiny(workdir):
    write_tiny_dataset(workdir / "data")
    cfg = dict(FAST)
    cfg["data_path"] = str(workdir / "data")
    cfg["checkpoint_dir"] = str(workdir / "saved")
    return cfg


@contextlib.contextmanager
def inside(root):
    """Run inside ``root`` with a clean command line (RecBole writes to the cwd and reads sys.argv)."""
    old, argv = os.getcwd(), sys.argv
    os.chdir(root)
    sys.argv = ["pytest"]
    try:
        yield
    finally:
        os.chdir(old)
        sys.argv = argv


def save_tiny_vit(folder, layers=2):
    """A tiny random-weight ViT (32 px, patches of 8, width 32) with its image processor, saved in
    ``folder`` as a transformers model folder; returns the folder."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """One tiny ViT model folder (two layers) for the image tests."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


def build_tiny(root, model, **overrides):
    """Config, dataset and (train, valid, test) loaders for ``model`` on a tiny dataset in ``root``.

    Runs inside ``root`` with a clean command line (RecBole writes to the cwd and reads sys.argv).
    """
    from recbole_mm.config import MMConfig
    from recbole_mm.data.lazy import data_preparation
    from recbole_mm.quick_start import create_dataset

    with inside(root):
        write_tiny_dataset(os.path.join(str(root), "data"), n_users=40, n_items=30)
        cfg = dict(FAST, data_path=os.path.join(str(root), "data"),
                   checkpoint_dir=os.path.join(str(root), "saved"), **overrides)
        config = MMConfig(model=model, dataset="tiny", config_dict=cfg)
        dataset = create_dataset(config)
        loaders = data_preparation(config, dataset)
    return config, dataset, loaders


def instantiate(config, train, model_class, **overrides):
    """A fresh model (seed 0, eval mode) from a copy of ``config`` with ``overrides``."""
    import copy

    config = copy.deepcopy(config)
    for key, value in overrides.items():
        config[key] = value
    torch.manual_seed(0)
    model = model_class(config, train._dataset)
    model.eval()
    return model


def counting_encoder(monkeypatch):
    """Wrap ``encode_texts`` where :func:`recbole_mm.features.extract.extract_features` looks it up, so a
    test sees how many texts each call encoded."""
    from recbole_mm.features import extract

    calls = []
    real_encode = extract.encode_texts

    def counting_encode(texts, **kw):
        calls.append(len(texts))
        return real_encode(texts, **kw)

    monkeypatch.setattr(extract, "encode_texts", counting_encode)
    return calls


def future_changed(inter, t=2, rows=8, n_items=30):
    """``(seq, length, changed)``: up to ``rows`` histories of ``inter`` with at least ``t + 2`` items,
    and a copy whose items after position ``t`` are other real items (the no-future-leakage tests:
    outputs at positions <= t must not change)."""
    seq, length = inter["item_id_list"].clone(), inter["item_length"].clone()
    keep = length >= t + 2
    seq, length = seq[keep][:rows], length[keep][:rows]
    changed = seq.clone()
    for b in range(changed.size(0)):
        n = int(length[b])
        changed[b, t + 1:n] = (changed[b, t + 1:n] % n_items) + 1
    return seq, length, changed
