"""DDP on CPU (gloo) through the command line, sharded feature extraction, backends.

The 2-process run goes through ``run_recbole_mm.py --nproc=2`` in a subprocess (spawned
ranks, a real process group); the checks then read its run record and checkpoint.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FAST, REPO, write_tiny_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cli_args(cfg):
    return [f"--{k}={v}" for k, v in cfg.items()]


def ddp_cli_run(root, model):
    """``run_recbole_mm.py --model=<model> --nproc=2`` (gloo on CPU) on a fresh tiny dataset of 41
    users in ``root``; returns (config dict, run record, completed process)."""
    # 41 users: DistributedSampler pads the 2 shards with a duplicate user, so RecBole's
    # average of per-rank averages would differ from the single-process metrics
    write_tiny_dataset(root / "data", n_users=41)
    cfg = dict(FAST, data_path=str(root / "data"), checkpoint_dir=str(root / "saved"))
    cmd = [sys.executable, os.path.join(REPO, "run_recbole_mm.py"), f"--model={model}", "--dataset=tiny",
           "--nproc=2", f"--port={free_port()}"] + cli_args(cfg)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [p for p in glob.glob(str(root / "log" / model / "*.json")) if not p.endswith(".failed.json")]
    assert len(records) == 1, records
    with open(records[0]) as f:
        record = json.load(f)
    return cfg, record, proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One TSSR epoch with 2 processes on CPU (gloo), on a fresh tiny dataset (so the text
    features are extracted, sharded over the two ranks, inside the run)."""
    root = tmp_path_factory.mktemp("ddp")
    cfg, record, proc = ddp_cli_run(root, "TSSR")
    return root, cfg, record, proc


def test_ddp_two_cpu_processes_complete_with_identical_replicas(ddp_run):
    root, cfg, record, proc = ddp_run
    assert record["status"] == "finished"
    dist = record["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    digests = dist["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # parameters identical on both ranks
    assert record["device"] == "cpu"
    assert record["config"]["hidden_size"] == FAST["hidden_size"]  # overrides reach the spawned ranks
    assert len(record["history"]["train_loss"]) == 1  # one epoch
    assert "test result" in proc.stdout


def test_ddp_rank0_alone_writes_logs_records_checkpoints(ddp_run):
    root, cfg, record, proc = ddp_run
    assert len(glob.glob(str(root / "log" / "TSSR" / "*.log"))) == 1
    assert len(os.listdir(root / "log_tensorboard")) == 1
    saved = sorted(os.listdir(root / "saved"))
    # one best checkpoint; the per-epoch "last" checkpoint is removed once the run finished
    assert len(saved) == 1 and saved[0].endswith(".pth") and "-last" not in saved[0], saved
    assert record["checkpoint"] == os.path.join(cfg["checkpoint_dir"], saved[0])
    # sharded extraction left no chunk folders behind
    assert not glob.glob(str(root / "data" / "tiny" / ".*chunks*"))


def test_ddp_test_metrics_equal_single_process_evaluation(ddp_run, monkeypatch):
    from recbole.data import data_preparation

    from recbole_mm.config import MMConfig
    from recbole_mm.quick_start import create_dataset
    from recbole_mm.registry import get_model, get_trainer

    root, cfg, record, proc = ddp_run
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    config = MMConfig(model="TSSR", dataset="tiny", config_dict=dict(cfg, checkpoint_dir=str(root / "eval")))
    assert config["single_spec"]
    dataset = create_dataset(config)
    _, _, test_data = data_preparation(config, dataset)
    model = get_model("TSSR")(config, test_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "TSSR")(config, model)
    single = trainer.evaluate(test_data, load_best_model=True, model_file=record["checkpoint"])
    ddp = record["test_result"]
    assert set(single) == set(ddp)
    for k in ddp:
        assert float(single[k]) == pytest.approx(ddp[k], abs=0), (k, single[k], ddp[k])


def test_sharded_extraction_matches_single_process(ddp_run, tmp_path):
    from recbole_mm.data.extract import extract_features
    from recbole_mm.data.features import FeatureStore

    root, cfg, record, proc = ddp_run
    ddp_store = FeatureStore(str(root / "data" / "tiny"), "tiny")
    ddp_fm = ddp_store.load("text")
    folder = tmp_path / "tiny"
    folder.mkdir()
    shutil.copy(root / "data" / "tiny" / "tiny.item", folder / "tiny.item")
    spec = {"type": "text", "encoder": "default", "pooling": "mean"}
    single = extract_features(str(folder), "tiny", "text", spec, show_progress=False)
    assert list(single.tokens) == list(ddp_fm.tokens)
    np.testing.assert_allclose(np.asarray(single.matrix), np.asarray(ddp_fm.matrix), atol=1e-5)
    assert not np.asarray(ddp_fm.missing).any()


def test_feature_tables_are_frozen_parameters_not_buffers(ddp_run, monkeypatch):
    """DDP broadcasts buffers on every forward; the feature tables must be frozen parameters."""
    from recbole.data import data_preparation

    from recbole_mm.config import MMConfig
    from recbole_mm.model.tssr import TSSR
    from recbole_mm.quick_start import create_dataset

    root, cfg, record, proc = ddp_run
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["pytest"])
    config = MMConfig(model="TSSR", dataset="tiny", config_dict=dict(cfg))
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    model = TSSR(config, train._dataset)
    assert sum(b.numel() for b in model.buffers()) == 0
    table = model.content.tables["text"].weight
    assert isinstance(table, torch.nn.Parameter) and not table.requires_grad
    assert table.shape == dataset.mm_features["text"].shape


def test_cpu_backend_is_gloo_and_nccl_without_gpu_is_a_clear_error(workdir):
    from recbole_mm.config import MMConfig

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: NCCL would really start")
    write_tiny_dataset(workdir / "data")
    cfg = dict(FAST, data_path=str(workdir / "data"), local_rank=0, nproc=1, world_size=1,
               ip="localhost", port=free_port(), offset=0, ddp_backend="nccl")
    with pytest.raises(ValueError, match="ddp_backend: nccl needs CUDA"):
        MMConfig(model="SASRec", dataset="tiny", config_dict=cfg)


def test_launcher_rejects_inconsistent_sizes():
    from recbole_mm.quick_start import run

    with pytest.raises(ValueError, match="nproc"):
        run("SASRec", "tiny", nproc=4, world_size=2)
    with pytest.raises(ValueError, match="group_offset"):
        run("SASRec", "tiny", nproc=2, world_size=4, group_offset=3)
