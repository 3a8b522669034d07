"""The installable plugin, compat layer, registry, config priority, runner, CLI."""

import glob
import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import yaml

import recbole_mm
from recbole_mm import compat
from recbole_mm.config import MMConfig
from recbole_mm.registry import UnknownModelError, get_model

from conftest import FAST, REPO, write_tiny_dataset


def test_numpy2_aliases_present_and_numpy_is_2():
    assert int(np.__version__.split(".")[0]) >= 2
    for name in ("float_", "complex_", "unicode_", "bool8"):
        assert hasattr(np, name), name


def test_pandas_below_3():
    import pandas as pd

    assert int(pd.__version__.split(".")[0]) < 3


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UnknownModelError) as info:
        get_model("SASRek")
    msg = str(info.value)
    assert "Unknown model 'SASRek'" in msg and "Did you mean SASRec" in msg
    assert "BERT4Rec" in msg and "\n" not in msg


def test_registry_finds_recbole_models_case_insensitively():
    from recbole.model.sequential_recommender import BERT4Rec, SASRec

    assert get_model("SASRec") is SASRec
    assert get_model("bert4rec") is BERT4Rec


def test_cli_unknown_model_one_line_error(workdir):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_recbole_mm.py"), "--model=NoSuchModel"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Unknown model 'NoSuchModel'" in lines[0] and "SASRec" in lines[0]
    assert "lightgbm" not in proc.stderr and "Traceback" not in proc.stderr


def test_properties_are_found():
    from recbole_mm.config import properties_dir

    assert os.path.isfile(os.path.join(properties_dir(), "overall.yaml"))


def test_config_priority(workdir, monkeypatch, tmp_path):
    """plugin model YAML > RecBole model YAML; user YAML > plugin YAML; command line > both."""
    import shutil

    import recbole_mm.config as cfgmod

    props = tmp_path / "props"
    shutil.copytree(cfgmod.properties_dir(), props)
    (props / "model").mkdir(exist_ok=True)
    (props / "model" / "SASRec.yaml").write_text("hidden_size: 32\ninner_size: 96\nn_heads: 4\n")
    monkeypatch.setattr(cfgmod, "properties_dir", lambda: str(props))
    write_tiny_dataset(workdir / "data")
    base = {"data_path": str(workdir / "data"), "use_gpu": False}

    c = MMConfig(model="SASRec", dataset="tiny", config_dict=base)
    assert c["hidden_size"] == 32  # plugin model YAML beats RecBole's SASRec.yaml (64)
    assert c["n_layers"] == 2  # RecBole's SASRec.yaml still fills what the plugin leaves out
    assert c["valid_metric"] == "NDCG@10" and c["loss_type"] == "CE"  # plugin overall.yaml

    user_yaml = tmp_path / "user.yaml"
    user_yaml.write_text("hidden_size: 48\ninner_size: 128\n")
    c = MMConfig(model="SASRec", dataset="tiny", config_file_list=[str(user_yaml)], config_dict=base)
    assert c["hidden_size"] == 48 and c["inner_size"] == 128 and c["n_heads"] == 4

    monkeypatch.setattr(sys, "argv", ["run_recbole_mm.py", "--hidden_size=16"])
    c = MMConfig(model="SASRec", dataset="tiny", config_file_list=[str(user_yaml)], config_dict=base)
    assert c["hidden_size"] == 16 and c["inner_size"] == 128


def test_ml100k_is_read_from_user_data_path(workdir):
    c = MMConfig(model="SASRec", dataset="ml-100k", config_dict={"data_path": str(workdir / "ds"), "use_gpu": False})
    assert c["data_path"] == os.path.join(str(workdir / "ds"), "ml-100k")
    assert os.path.isfile(os.path.join(c["data_path"], "ml-100k.inter"))


def test_sasrec_python_api_tiny_dataset(tiny, workdir):
    preloaded = {m for m in ("ray", "recbole.quick_start") if m in sys.modules}  # by other tests (test_compat)
    result = recbole_mm.run_recbole_mm(model="SASRec", dataset="tiny", config_dict=tiny)
    for key in ("best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"):
        assert key in result
    assert set(result["test_result"]) >= {"hit@10", "ndcg@10", "mrr@10", "hit@5", "ndcg@20"}
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    # the run did not import RecBole's quick_start (and with it ray)
    assert "ray" in preloaded or "ray" not in sys.modules
    assert "recbole.quick_start" in preloaded or "recbole.quick_start" not in sys.modules

    # the record sits next to RecBole's log and holds config, metrics, timings, versions
    rec_path = result["record_path"]
    assert rec_path and os.path.isfile(rec_path)
    assert os.path.isfile(os.path.splitext(rec_path)[0] + ".log")
    with open(rec_path) as f:
        rec = json.load(f)
    assert rec["status"] == "finished" and rec["model"] == "SASRec" and rec["dataset"] == "tiny"
    assert rec["test_result"]["ndcg@10"] == pytest.approx(result["test_result"]["ndcg@10"])
    assert set(rec["timings_s"]) >= {"data", "train", "test", "total"}
    assert rec["versions"]["recbole"] == "1.2.1" and rec["versions"]["torch"]
    assert rec["config"]["hidden_size"] == 16
    assert len(rec["history"]["valid_score"]) == 1

    # the best checkpoint was saved and reloaded for the test on torch >= 2.6
    ckpts = glob.glob(os.path.join(tiny["checkpoint_dir"], "SASRec-*.pth"))
    assert len(ckpts) == 1
    assert rec["test_checkpoint"] == rec["checkpoint"] == ckpts[0]
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpts[0])  # what RecBole itself does on torch >= 2.6
    assert "state_dict" in compat.torch_load(ckpts[0])


def test_objective_function_contract(tiny):
    cfg = dict(tiny, model="SASRec", dataset="tiny")
    checkpoint_dir = cfg.pop("checkpoint_dir")
    out = recbole_mm.objective_function(config_dict=cfg, saved=True)
    assert set(out) == {"model", "best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}
    assert out["model"] == "SASRec" and out["valid_score_bigger"] is True
    assert out["best_valid_score"] == pytest.approx(out["best_valid_result"]["ndcg@10"])
    assert not os.path.exists(checkpoint_dir) and not os.path.exists("saved")  # temporary folder


def test_cli_runs_bert4rec_with_overrides(workdir):
    write_tiny_dataset(workdir / "data")
    args = [f"--{k}={v}" for k, v in FAST.items()] + [
        f"--data_path={workdir / 'data'}", "--model=BERT4Rec", "--dataset=tiny",
    ]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_recbole_mm.py")] + args,
        capture_output=True, text=True, timeout=300, cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test result:" in proc.stdout and "ndcg@10" in proc.stdout
    records = glob.glob(str(workdir / "log" / "BERT4Rec" / "*.json"))
    assert len(records) == 1
    assert json.load(open(records[0]))["config"]["hidden_size"] == 16


def test_config_priority_with_shipped_tssr_yaml(workdir, tmp_path):
    """The shipped properties/model/TSSR.yaml < a user YAML < the command line."""
    write_tiny_dataset(workdir / "data")
    base = {"data_path": str(workdir / "data"), "use_gpu": False}
    c = MMConfig(model="TSSR", dataset="tiny", config_dict=base)
    shipped = yaml.safe_load(open(os.path.join(REPO, "properties", "model", "TSSR.yaml")))
    assert c["n_cross_layers"] == shipped["n_cross_layers"] and c["tau_u"] == shipped["tau_u"]
    user_yaml = tmp_path / "tssr.yaml"
    user_yaml.write_text("n_cross_layers: 3\ntau_u: 0.5\n")
    c = MMConfig(model="TSSR", dataset="tiny", config_file_list=[str(user_yaml)], config_dict=base)
    assert c["n_cross_layers"] == 3 and c["tau_u"] == 0.5
    sys.argv = ["run_recbole_mm.py", "--n_cross_layers=1"]
    c = MMConfig(model="TSSR", dataset="tiny", config_file_list=[str(user_yaml)], config_dict=base)
    assert c["n_cross_layers"] == 1 and c["tau_u"] == 0.5


def test_record_git_commit_is_the_one_at_run_start(monkeypatch):
    """A run's record names the commit of the code it imported, read at its start: checking out
    another commit while it trains (e.g. a long study cell) does not relabel it."""
    from recbole_mm import quick_start

    quick_start.git_commit.cache_clear()
    at_start = quick_start.git_commit()

    def moved(*args, **kwargs):  # the checkout moved on after the run started
        return types.SimpleNamespace(returncode=0, stdout="f" * 40 + "\n")

    monkeypatch.setattr(quick_start.subprocess, "run", moved)
    assert quick_start.git_commit() == at_start
    quick_start.git_commit.cache_clear()
    assert quick_start.git_commit().startswith("f" * 40)  # uncached, it would have read the new commit
    quick_start.git_commit.cache_clear()
