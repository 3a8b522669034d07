"""A training run killed with SIGKILL resumes from its last epoch and ends exactly
where an uninterrupted run with the same seed ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST, REPO, write_tiny_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Runs the normal command line, but blocks at the start of epoch HANG_AT_EPOCH (after the
# previous epochs are done and checkpointed) and tells the test, which then SIGKILLs it.
HANGING_CLI = """
import os, sys, time
import recbole_mm.trainer as trainer

_train_epoch = trainer.SafeLoadingMixin._train_epoch

def hanging_train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
    if epoch_idx == int(os.environ["HANG_AT_EPOCH"]):
        open(os.environ["HANG_MARKER"], "w").close()
        time.sleep(600)
    return _train_epoch(self, train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

trainer.SafeLoadingMixin._train_epoch = hanging_train_epoch
from recbole_mm.__main__ import main
sys.exit(main())
"""


def _args(cfg):
    return ["--model=TSSR", "--dataset=tiny"] + [f"--{k}={v}" for k, v in cfg.items()]


def _record(path):
    with open(path) as f:
        return json.load(f)


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from recbole_mm.compat import torch_load
    from recbole_mm.quick_start import run_recbole_mm

    write_tiny_dataset(tmp_path / "data")
    base = dict(FAST, epochs=4, data_path=str(tmp_path / "data"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HANG_AT_EPOCH="2",
               HANG_MARKER=str(tmp_path / "hanging"))
    cli = os.path.join(REPO, "run_recbole_mm.py")
    script = tmp_path / "hanging_cli.py"
    script.write_text(HANGING_CLI)

    # features first (the two runs below would otherwise extract them concurrently)
    from recbole_mm.data.extract import extract_features

    extract_features(str(tmp_path / "data" / "tiny"), "tiny", "text", {"type": "text"}, show_progress=False)

    killed_cfg = dict(base, checkpoint_dir=str(tmp_path / "saved"), record_path=str(tmp_path / "killed.json"))
    killed = subprocess.Popen([sys.executable, str(script)] + _args(killed_cfg), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # meanwhile, the uninterrupted reference run, in this process (one thread, as the CLI runs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["pytest"])
        try:
            run_recbole_mm(model="TSSR", dataset="tiny",
                           config_dict=dict(base, checkpoint_dir=str(tmp_path / "saved_full"),
                                            record_path=str(tmp_path / "full.json")))
        finally:
            torch.set_num_threads(threads)
        deadline = time.time() + 240
        while not os.path.exists(env["HANG_MARKER"]):
            assert killed.poll() is None, killed.communicate()[1][-4000:]
            assert time.time() < deadline, "the run never reached its third epoch"
            time.sleep(0.1)
        killed.send_signal(signal.SIGKILL)  # after its second epoch, in the third
        killed.communicate(timeout=60)
        assert killed.returncode == -signal.SIGKILL
    finally:
        if killed.poll() is None:
            killed.kill()

    # what the killed run left: its best checkpoint and its last checkpoint (epoch index 1)
    saved = sorted(os.listdir(tmp_path / "saved"))
    last = [f for f in saved if f.endswith("-last.pth")]
    assert len(last) == 1 and last[0].startswith("TSSR-tiny-"), saved
    assert not [f for f in saved if ".tmp" in f], saved
    ckpt = torch_load(str(tmp_path / "saved" / last[0]))
    assert ckpt["epoch"] == 1 and not ckpt["finished"]
    assert len(ckpt["history"]["train_loss"]) == 2 and len(ckpt["rng"]) == 1
    assert "optimizer" in ckpt and ckpt["optimizer"]["state"]
    assert not os.path.exists(killed_cfg["record_path"])

    # resume: same command plus --resume
    resumed_cfg = dict(killed_cfg, record_path=str(tmp_path / "resumed.json"))
    proc = subprocess.run([sys.executable, cli, "--resume"] + _args(resumed_cfg), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    resumed, reference = _record(resumed_cfg["record_path"]), _record(str(tmp_path / "full.json"))
    assert resumed["resumed_from"]["epoch"] == 1 and reference["resumed_from"] is None
    assert resumed["test_result"] == reference["test_result"]
    assert resumed["best_valid_result"] == reference["best_valid_result"]
    assert resumed["best_valid_score"] == reference["best_valid_score"]
    # the history runs on across the resume as if nothing happened
    for key in ("train_loss", "valid_score", "valid_result"):
        assert resumed["history"][key] == reference["history"][key], key
    assert len(resumed["history"]["train_loss"]) == 4
    # a finished run leaves no last checkpoint (a rerun trains afresh)
    assert not [f for f in os.listdir(tmp_path / "saved") if f.endswith("-last.pth")]


def test_run_key_ignores_paths_and_logging_but_not_training_settings(workdir):
    from recbole_mm.config import MMConfig
    from recbole_mm.trainer import last_checkpoint_path, run_key

    write_tiny_dataset(workdir / "data")
    cfg = dict(FAST, data_path=str(workdir / "data"))

    def key(**over):
        return run_key(MMConfig(model="SASRec", dataset="tiny", config_dict=dict(cfg, **over)))

    k = key()
    assert k == key(checkpoint_dir="elsewhere", state="INFO", show_progress=True, resume="true")
    assert k != key(learning_rate=0.01)
    assert k != key(seed=8)
    path = last_checkpoint_path(MMConfig(model="SASRec", dataset="tiny", config_dict=dict(cfg, checkpoint_dir="c")))
    assert path == os.path.join("c", f"SASRec-tiny-{k}-last.pth")


def test_resume_true_without_checkpoint_is_a_clear_error(workdir):
    from recbole_mm.quick_start import run_recbole_mm

    write_tiny_dataset(workdir / "data")
    cfg = dict(FAST, data_path=str(workdir / "data"), checkpoint_dir=str(workdir / "saved"), resume=True)
    with pytest.raises(FileNotFoundError, match="no last checkpoint"):
        run_recbole_mm(model="SASRec", dataset="tiny", config_dict=cfg)


def test_resume_auto_continues_and_false_starts_afresh(workdir):
    """In-process: a last checkpoint left by an interrupted SASRec run is picked up by
    ``resume: auto`` (the default) and ignored by ``resume: false``."""
    import recbole_mm.trainer as trainer
    from recbole_mm.quick_start import run_recbole_mm

    write_tiny_dataset(workdir / "data")
    cfg = dict(FAST, epochs=3, data_path=str(workdir / "data"), checkpoint_dir=str(workdir / "saved"))

    class Interrupt(Exception):
        pass

    original = trainer.SafeLoadingMixin._save_last_checkpoint

    def interrupt_after_first(self, path, epoch_idx, train_data, finished):
        original(self, path, epoch_idx, train_data, finished)
        if epoch_idx == 0:
            raise Interrupt()

    trainer.SafeLoadingMixin._save_last_checkpoint = interrupt_after_first
    try:
        with pytest.raises(Interrupt):
            run_recbole_mm(model="SASRec", dataset="tiny", config_dict=dict(cfg))
    finally:
        trainer.SafeLoadingMixin._save_last_checkpoint = original
    auto = run_recbole_mm(model="SASRec", dataset="tiny", config_dict=dict(cfg))
    rec = _record(auto["record_path"])
    assert rec["resumed_from"]["epoch"] == 0 and len(rec["history"]["train_loss"]) == 3
    fresh = run_recbole_mm(model="SASRec", dataset="tiny", config_dict=dict(cfg, resume=False))
    assert _record(fresh["record_path"])["resumed_from"] is None
    assert fresh["test_result"] == auto["test_result"]  # same seed, same result either way


@pytest.mark.parametrize("interrupted_step", ["SASRec", "SICSRec"])
def test_sicsrec_resumes_in_either_step(interrupted_step, workdir):
    """SICSRec interrupted in step 1 (its ID SASRec) or in step 2 resumes (``resume: auto``)
    to the result of an uninterrupted run; no last checkpoint is left behind."""
    import recbole_mm.trainer as trainer
    from recbole_mm.quick_start import run_recbole_mm

    write_tiny_dataset(workdir / "data")
    cfg = dict(FAST, epochs=2, stage1=False, data_path=str(workdir / "data"))

    class Interrupt(Exception):
        pass

    original = trainer.SafeLoadingMixin._save_last_checkpoint

    def interrupt(self, path, epoch_idx, train_data, finished):
        original(self, path, epoch_idx, train_data, finished)
        if epoch_idx == 0 and self.config["model"] == interrupted_step:
            raise Interrupt()

    saved = dict(cfg, checkpoint_dir=str(workdir / "saved"))
    trainer.SafeLoadingMixin._save_last_checkpoint = interrupt
    try:
        with pytest.raises(Interrupt):
            run_recbole_mm(model="SICSRec", dataset="tiny", config_dict=saved)
    finally:
        trainer.SafeLoadingMixin._save_last_checkpoint = original
    assert [f for f in os.listdir(workdir / "saved") if f.startswith(f"{interrupted_step}-tiny-")
            and f.endswith("-last.pth")]
    resumed = run_recbole_mm(model="SICSRec", dataset="tiny", config_dict=saved)
    reference = run_recbole_mm(model="SICSRec", dataset="tiny",
                               config_dict=dict(cfg, checkpoint_dir=str(workdir / "saved_ref")))
    assert resumed["test_result"] == reference["test_result"]
    rec = _record(resumed["record_path"])
    if interrupted_step == "SICSRec":
        assert rec["resumed_from"]["epoch"] == 0
    else:
        assert '"resumed"' in json.dumps(rec["history"].get("step1"))  # step 1's own history says so
    assert not [f for f in os.listdir(workdir / "saved") if f.endswith("-last.pth")]
