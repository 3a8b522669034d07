"""What a new user sees first: --help, the epoch loss line, the result lines."""

import re
import subprocess
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest

from conftest import REPO

ANSI = re.compile(r"\x1b\[[0-9;]*m")

STUDY_FLAGS = ("--study", "--dry-run", "--jobs", "--max-cells", "--report-only", "--output-dir", "--no-progress")


def _plain(text):
    return ANSI.sub("", text)


def test_help_lists_study_flags_tune_and_overrides():
    proc = subprocess.run([sys.executable, "run_recbole_mm.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for flag in STUDY_FLAGS + ("--debug", "--fresh", "--resume"):
        assert flag in out, flag
    assert "study (with --study FILE)" in out
    assert "tune --help" in out and "--key=value" in out and "config override" in out


def test_help_study_group_is_study_parsers_own():
    """Every option of recbole_mm.study's parser (but the hidden --run-cell) is in the main parser."""
    from recbole_mm.__main__ import build_parser
    from recbole_mm.study import build_parser as study_parser

    main_flags = {o for a in build_parser()._actions for o in a.option_strings}
    study_flags = {o for a in study_parser()._actions for o in a.option_strings if a.dest != "run_cell"}
    assert study_flags <= main_flags


def test_study_flag_without_study_is_an_error(capsys):
    from recbole_mm.__main__ import main

    assert main(["--model=SASRec", "--dry-run"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_tune_help_lists_its_flags(capsys):
    from recbole_mm.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["tune", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "run_recbole_mm.py tune" in out
    for flag in ("--params_file", "--algo", "--max_evals", "--output_file"):
        assert flag in out, flag


def _trainer(model):
    from recbole_mm.trainer import MMTrainer

    trainer = MMTrainer.__new__(MMTrainer)  # no model or data needed for the log line
    trainer.config = {"loss_decimal_place": 4}
    trainer.model = model
    return trainer


def test_epoch_line_names_the_losses():
    trainer = _trainer(types.SimpleNamespace(loss_names=("ce", "user_cl", "item_cl")))
    line = _plain(trainer._generate_train_loss_output(3, 0.0, 1.5, (1.0, 0.25, 0.125)))
    assert line == "epoch 3 training [time: 1.50s, train_loss: 1.3750 | ce: 1.0000, user_cl: 0.2500, item_cl: 0.1250]"


def test_epoch_line_falls_back_to_recbole_without_names():
    trainer = _trainer(types.SimpleNamespace())
    line = _plain(trainer._generate_train_loss_output(0, 0.0, 1.0, (1.0, 0.5)))
    assert "train_loss1: 1.0000, train_loss2: 0.5000" in line
    # names that do not match the tuple: RecBole's numbering, never a wrong name
    trainer = _trainer(types.SimpleNamespace(loss_names=("ce", "user_cl", "item_cl")))
    assert "train_loss2" in _plain(trainer._generate_train_loss_output(0, 0.0, 1.0, (1.0, 0.5)))
    assert "train loss: 0.5000" in _plain(trainer._generate_train_loss_output(0, 0.0, 1.0, 0.5))


def test_model_loss_names_follow_the_active_terms():
    from recbole_mm.model.sicsrec import SICSRec
    from recbole_mm.model.tssr import TSSR

    names = TSSR.loss_names.fget
    assert names(types.SimpleNamespace(lambda_u=0.1, lambda_i=0.1)) == ("ce", "user_cl", "item_cl")
    assert names(types.SimpleNamespace(lambda_u=0.0, lambda_i=0.1)) == ("ce", "item_cl")
    names = SICSRec.loss_names.fget
    assert names(types.SimpleNamespace(alpha=0.5, reg_weight=0.0)) == ("ce", "cacl")


def test_result_line_is_clean():
    from recbole_mm.trainer import format_metrics

    result = OrderedDict([("hit@5", np.float64(0.1)), ("ndcg@5", np.float64(0.07125))])
    line = format_metrics(result)
    assert line == "hit@5: 0.1000  ndcg@5: 0.0712"
    assert "OrderedDict" not in line and "np.float64" not in line
    assert format_metrics(None) == "None"


def test_cpu_threads_auto_uses_the_free_cores(monkeypatch):
    """The README command is fast as written: no OMP_NUM_THREADS needed (issue 16)."""
    import torch

    from recbole_mm import quick_start

    class Cfg(dict):
        def __getitem__(self, key):
            return self.get(key)

    cfg = Cfg(device=torch.device("cpu"), cpu_threads="auto", single_spec=True)
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(quick_start.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    try:
        monkeypatch.setattr(quick_start, "_busy_cpus", lambda: 0.0)
        assert quick_start.choose_cpu_threads(cfg)[0] == 2  # idle 2-core machine: both cores
        monkeypatch.setattr(quick_start, "_busy_cpus", lambda: 1.0)
        n, why = quick_start.choose_cpu_threads(cfg)
        assert n == 1 and "1 busy" in why  # one other busy process: one thread
        cfg["cpu_threads"] = 2
        assert quick_start.choose_cpu_threads(cfg) == (2, "cpu_threads")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        cfg["cpu_threads"] = "auto"
        torch.set_num_threads(1)
        assert quick_start.choose_cpu_threads(cfg) == (1, "OMP_NUM_THREADS")
        assert quick_start.choose_cpu_threads(Cfg(device=torch.device("cuda", 0))) is None
    finally:
        torch.set_num_threads(before)


def _cli(cwd, *args):
    import os
    import time

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_recbole_mm.py"), *args], cwd=str(cwd),
                          capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - t0


def test_misspelled_model_is_rejected_fast(workdir):
    proc, wall = _cli(workdir, "--model=SASRek", "--dataset=ml-100k")
    assert proc.returncode == 2 and "Did you mean SASRec" in proc.stderr
    assert wall < 10, wall
    assert not (workdir / "dataset").exists()  # nothing loaded or copied


def test_missing_dataset_is_a_short_error(workdir):
    proc, wall = _cli(workdir, "--model=SASRec", "--dataset=my_data", "--data_path=nowhere")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: nowhere/my_data: the dataset folder for 'my_data' does not exist")
    assert len(lines) <= 4, lines  # the error, its fix, the format's link, --debug; no config dump
    assert proc.stdout.strip() == "" and not (workdir / "log").exists()


def test_parallel_study_cells_share_the_cores(monkeypatch):
    from recbole_mm import study

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(study.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    fake = types.SimpleNamespace(jobs=2, keep_checkpoints=False, output_dir="/tmp")
    assert study._child_env(fake)["OMP_NUM_THREADS"] == "2"
    fake.jobs = 1
    assert "OMP_NUM_THREADS" not in study._child_env(fake)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    fake.jobs = 2
    assert study._child_env(fake)["OMP_NUM_THREADS"] == "3"
