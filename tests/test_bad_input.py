"""Bad input is stopped at the door, and no run prints a silently wrong result.

Each case builds the bad input on tiny data and asserts the class of outcome: a clear error that
names the file/key and the fix, a counted warning with a correct run, or a refusal. Malformed
atomic files are covered case by case in ``test_preflight.py``, feature-store cases in
``test_features.py`` / ``test_extract.py``, RecBole's own loaders in ``test_compat.py``.
"""

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from recbole_mm.config import MMConfig
from recbole_mm.data.checks import DuplicateInteractionsError, find_duplicates
from recbole_mm.quick_start import run_recbole_mm
from recbole_mm.validate import ConfigError

from conftest import FAST, REPO, write_tiny_dataset

RUN = dict(FAST, epochs=2, valid_metric="Hit@10", metrics=["Hit", "NDCG"], topk=[5, 10])


def _cfg(workdir, **extra):
    return {**RUN, "data_path": str(workdir / "data"), "checkpoint_dir": str(workdir / "saved"), **extra}


def _double_rows(folder, name="tiny"):
    path = os.path.join(folder, f"{name}.inter")
    with open(path) as f:
        lines = f.read().strip().split("\n")
    with open(path, "w") as f:
        f.write("\n".join([lines[0]] + [row for row in lines[1:] for _ in (0, 1)]) + "\n")


# ----------------------------------------------------------------------------- duplicates


def test_find_duplicates_exact_and_consecutive():
    inter = pd.DataFrame({"u": ["a", "a", "a", "a", "b", "b"], "i": ["x", "x", "y", "y", "x", "y"],
                          "t": [1.0, 1.0, 2.0, 3.0, 1.0, 2.0]})
    exact, repeat = find_duplicates(inter, "u", "i", "t")
    assert exact.tolist() == [False, True, False, False, False, False]
    assert repeat.tolist() == [False, False, False, True, False, False]  # a: x, y, y -> the second y
    # time order, not file order, decides what is consecutive
    shuffled = inter.iloc[[3, 0, 5, 2, 4, 1]].reset_index(drop=True)
    exact2, repeat2 = find_duplicates(shuffled, "u", "i", "t")
    assert exact2.sum() == 1 and repeat2.sum() == 1


def test_doubled_inter_file_gives_the_clean_metrics_and_says_so(workdir):
    """Every row doubled gave Hit@5 = 1.0 with no warning; now the duplicates are dropped and counted."""
    write_tiny_dataset(workdir / "data")
    clean = run_recbole_mm(model="SASRec", dataset="tiny", config_dict=_cfg(workdir))
    _double_rows(str(workdir / "data" / "tiny"))
    doubled = run_recbole_mm(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, state="WARNING"))
    for key, value in clean["test_result"].items():
        assert doubled["test_result"][key] == pytest.approx(value, abs=1e-6), key
    n_rows = sum(1 for _ in open(workdir / "data" / "tiny" / "tiny.inter")) - 1
    rec = json.load(open(doubled["record_path"]))
    text = open(rec["log_file"]).read()  # RecBole's log (the run replaces the root logger's handlers)
    assert f"{n_rows // 2} of {n_rows} interactions are exact duplicate rows" in text and "Dropped" in text
    assert rec["data_checks"]["exact_duplicates"] == n_rows // 2
    assert rec["data_checks"]["dropped"] == n_rows // 2
    # keep: trains on them, and the metric inflation is visible (the target is in the history)
    kept = run_recbole_mm(model="SASRec", dataset="tiny",
                          config_dict=_cfg(workdir, duplicate_interactions="keep"))
    assert kept["test_result"]["hit@10"] >= clean["test_result"]["hit@10"]


def test_duplicates_can_stop_the_run(workdir):
    write_tiny_dataset(workdir / "data")
    _double_rows(str(workdir / "data" / "tiny"))
    with pytest.raises(DuplicateInteractionsError) as info:
        run_recbole_mm(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, duplicate_interactions="error"))
    msg = str(info.value)
    assert "tiny.inter" in msg and "exact duplicate" in msg and "duplicate_interactions: drop" in msg


def test_consecutive_repeats_are_dropped_for_plugin_datasets_too(workdir, caplog):
    from conftest import build_tiny

    folder = write_tiny_dataset(workdir / "data")
    path = os.path.join(folder, "tiny.inter")
    rows = open(path).read().strip().split("\n")
    u, i, t = rows[1].split("\t")
    rows.insert(2, f"{u}\t{i}\t{float(t) + 0.5}")  # the same item again, half a second later
    open(path, "w").write("\n".join(rows) + "\n")
    from recbole_mm.quick_start import create_dataset

    config = MMConfig(model="SASRec", dataset="tiny", config_dict=_cfg(workdir))
    with caplog.at_level(logging.WARNING):
        ds = create_dataset(config)
    assert ds.interaction_checks["consecutive_repeats"] == 1 and ds.interaction_checks["dropped"] == 1
    assert "consecutive repeats" in caplog.text
    assert len(ds.inter_feat) == len(rows) - 2


# ----------------------------------------------------------------------------- config keys and values


def _no_run_outputs(workdir):
    return not glob.glob(str(workdir / "log" / "**" / "*.log"), recursive=True)


@pytest.mark.parametrize("where", ["yaml", "dict", "cmd"])
def test_typo_key_stops_with_did_you_mean(workdir, monkeypatch, where):
    write_tiny_dataset(workdir / "data")
    files, cfg = None, _cfg(workdir)
    if where == "yaml":
        (workdir / "my.yaml").write_text("epochs: 1\nhiden_size: 16\n")
        files = [str(workdir / "my.yaml")]
    elif where == "dict":
        cfg["hiden_size"] = 16
    else:
        monkeypatch.setattr(sys, "argv", ["run", "--hiden_size=16"])
    with pytest.raises(ConfigError) as info:
        run_recbole_mm(model="SASRec", dataset="tiny", config_file_list=files, config_dict=cfg)
    msg = str(info.value)
    assert "hiden_size" in msg and "did you mean hidden_size" in msg
    assert {"yaml": "my.yaml:2", "dict": "config_dict", "cmd": "command line --hiden_size"}[where] in msg
    assert _no_run_outputs(workdir)  # stopped before the log, the data and the training


def test_keys_the_code_reads_stay_accepted(workdir):
    write_tiny_dataset(workdir / "data")
    # a RecBole key without a default in any YAML file, a RecBole key of another model, a plugin key
    MMConfig(model="SASRec", dataset="tiny",
             config_dict=_cfg(workdir, dataset_save_path=None, n_layers=1, lambda_u=0.1))


@pytest.mark.parametrize("setting, expected", [
    ({"hidden_size": "abc"}, "hidden_size must be an integer (default 64), got 'abc'"),
    ({"learning_rate": "fast"}, "learning_rate must be a number"),
    ({"show_progress": "yes"}, "show_progress must be a boolean"),
    ({"epochs": -1}, "epochs must be a positive integer, got -1 (a non-positive budget trains nothing)"),
    ({"epochs": 0}, "epochs must be a positive integer, got 0"),
    ({"valid_metric": "NDCG@50"}, "valid_metric 'NDCG@50' is not computed"),
    ({"valid_metric": "Recall@10"}, "is not computed"),
])
def test_bad_values_stop_before_any_data(workdir, setting, expected):
    write_tiny_dataset(workdir / "data")
    with pytest.raises(ConfigError) as info:
        run_recbole_mm(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, **setting))
    assert expected in str(info.value)
    assert _no_run_outputs(workdir) and not os.path.exists(workdir / "saved")


def test_unknown_keys_can_be_allowed(workdir, caplog):
    write_tiny_dataset(workdir / "data")
    with caplog.at_level(logging.WARNING):
        MMConfig(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, my_note=1, strict_config_keys=False))
    assert "unknown config key 'my_note'" in caplog.text


def test_config_file_missing_or_malformed(workdir):
    write_tiny_dataset(workdir / "data")
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml not found"):
        MMConfig(model="SASRec", dataset="tiny", config_file_list=[str(workdir / "nope.yaml")],
                 config_dict=_cfg(workdir))
    bad = workdir / "bad.yaml"
    bad.write_text("epochs: 1\nhidden_size: [16,\nn_layers: 1\n")
    with pytest.raises(ConfigError) as info:
        MMConfig(model="SASRec", dataset="tiny", config_file_list=[str(bad)], config_dict=_cfg(workdir))
    msg = str(info.value)
    assert "bad.yaml:" in msg and "malformed YAML" in msg and "<unicode string>" not in msg
    listing = workdir / "list.yaml"
    listing.write_text("- epochs\n- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        MMConfig(model="SASRec", dataset="tiny", config_file_list=[str(listing)], config_dict=_cfg(workdir))
    empty = workdir / "empty.yaml"
    empty.write_text("# nothing set\n")
    MMConfig(model="SASRec", dataset="tiny", config_file_list=[str(empty)], config_dict=_cfg(workdir))


def test_tune_and_study_share_the_validator(workdir):
    from recbole_mm.study import StudyError, validate_study
    from recbole_mm.tune import tune

    write_tiny_dataset(workdir / "data")
    params = workdir / "p.hyper"
    params.write_text("hiden_size choice [8,16]\n")
    pytest.importorskip("hyperopt")
    with pytest.raises(ConfigError, match="unknown config key 'hiden_size' \\(did you mean hidden_size"):
        tune("SASRec", "tiny", params_file=str(params), fixed=_cfg(workdir), output_file=str(workdir / "t.md"))
    spec = {"datasets": ["tiny"], "models": ["SASRec"], "seeds": [1],
            "config": {"data_path": str(workdir / "data"), "hidden_size": "abc"}}
    with pytest.raises(StudyError, match="hidden_size must be an integer"):
        validate_study(spec, output_dir=str(workdir / "study"))


# ----------------------------------------------------------------------------- folders the run writes


def _read_only(monkeypatch, target):
    """Make ``target`` look unwritable (root ignores file modes)."""
    real_access = os.access

    def access(path, mode):
        if os.path.abspath(path) == os.path.abspath(target) and mode & os.W_OK:
            return False
        return real_access(path, mode)

    monkeypatch.setattr(os, "access", access)


def test_unwritable_checkpoint_dir_stops_before_data(workdir, monkeypatch):
    write_tiny_dataset(workdir / "data")
    target = str(workdir / "ro")
    os.makedirs(target)
    _read_only(monkeypatch, target)
    with pytest.raises(ConfigError, match="cannot write checkpoints to .*ro/saved .*checkpoint_dir"):
        run_recbole_mm(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, checkpoint_dir=target + "/saved"))
    assert _no_run_outputs(workdir)


@pytest.mark.parametrize("what", ["log", "record"])
def test_unwritable_log_or_record_folder_stops_before_data(workdir, monkeypatch, what):
    """RecBole's log/ (in the working directory) and the run record's folder, checked before any data."""
    write_tiny_dataset(workdir / "data")
    if what == "log":
        _read_only(monkeypatch, workdir)  # log/ does not exist yet: its parent, the working directory, decides
        match, extra = "cannot write RecBole's log to .*Run from a writable working directory", {}
    else:
        os.makedirs(workdir / "ro")
        _read_only(monkeypatch, workdir / "ro")
        match, extra = "cannot write the run record to .*record_path", {"record_path": str(workdir / "ro" / "r.json")}
    with pytest.raises(ConfigError, match=match):
        run_recbole_mm(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, **extra))
    assert not (workdir / "dataset").exists() and not (workdir / "saved").exists()


def test_fresh_on_the_command_line(workdir):
    """--fresh means resume: false; with --resume=true it is a contradiction, refused in one line."""
    write_tiny_dataset(workdir / "data")
    proc = _cli(workdir, "--model=SASRec", "--dataset=tiny", f"--data_path={workdir / 'data'}", "--fresh",
                "--resume=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: --fresh and --resume contradict each other; give one"


# ----------------------------------------------------------------------------- records and faults


def test_failed_run_record_and_no_finished_record(workdir, monkeypatch):
    from recbole_mm import quick_start

    write_tiny_dataset(workdir / "data")

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure in training")

    monkeypatch.setattr(quick_start, "data_preparation", boom)
    record = workdir / "rec" / "run.json"
    with pytest.raises(RuntimeError) as info:
        run_recbole_mm(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, record_path=str(record)))
    failed = json.load(open(workdir / "rec" / "run.failed.json"))
    assert failed["status"] == "failed" and "simulated failure" in failed["error"]
    assert "Traceback" in failed["traceback"]
    assert info.value.recbole_mm_record == str(workdir / "rec" / "run.failed.json")
    assert not record.exists() and not (workdir / "rec" / "run.running.json").exists()


def test_dead_running_marker_is_recognised(workdir):
    from recbole_mm import records

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    folder = workdir / "log"
    os.makedirs(folder)
    path = records.write_running(str(folder / "r1.json"))
    data = json.load(open(path))
    data["pid"] = proc.pid  # a process that has ended: as after SIGKILL / the OOM killer
    json.dump(data, open(path, "w"))
    alive = records.write_running(str(folder / "r2.json"))  # this process: alive
    assert records.dead_run(str(folder / "r1.json")) is not None
    assert records.dead_run(str(folder / "r2.json")) is None
    found = records.collect_dead_runs(str(folder))
    assert found == [str(folder / "r1.dead.json")]
    assert json.load(open(found[0]))["status"] == "dead" and os.path.exists(alive)


def test_rerun_announces_resume_first(workdir, caplog):
    from recbole_mm.quick_start import announce_resume
    from recbole_mm.trainer import last_checkpoint_path

    write_tiny_dataset(workdir / "data")
    config = MMConfig(model="SASRec", dataset="tiny", config_dict=_cfg(workdir))
    path = last_checkpoint_path(config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    with caplog.at_level(logging.WARNING):
        assert announce_resume(config, logging.getLogger("t")) == path
    assert "RESUMING" in caplog.text and "--fresh" in caplog.text
    fresh = MMConfig(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, resume="false"))
    assert announce_resume(fresh, logging.getLogger("t")) is None


def _cli(workdir, *args, env=None, timeout=240):
    return subprocess.run([sys.executable, os.path.join(REPO, "run_recbole_mm.py"), *args],
                          cwd=str(workdir), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def test_cli_prints_one_line_and_traceback_only_with_debug(workdir):
    write_tiny_dataset(workdir / "data")
    args = ["--model=SASRec", "--dataset=tiny", f"--data_path={workdir / 'data'}", "--hiden_size=16"]
    proc = _cli(workdir, *args)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("error: command line --hiden_size: unknown config key") and "hidden_size" in first
    debug = _cli(workdir, *args, env={"RECBOLE_MM_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_leaves_an_interrupted_record(workdir, sig):
    """SIGTERM (or Ctrl-C's SIGINT) mid-training: an ``interrupted`` record with the last finished
    epoch, no running marker."""
    signum = getattr(signal, sig)
    write_tiny_dataset(workdir / "data", n_users=300, n_items=60, min_len=20, max_len=40)
    record = workdir / "rec" / "run.json"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "run_recbole_mm.py"), "--model=SASRec", "--dataset=tiny",
         f"--data_path={workdir / 'data'}", f"--checkpoint_dir={workdir / 'saved'}", f"--record_path={record}",
         "--epochs=200", "--stopping_step=200", "--hidden_size=16", "--inner_size=16", "--n_layers=1",
         "--n_heads=1", "--MAX_ITEM_LIST_LENGTH=10", "--train_batch_size=32", "--show_progress=False"],
        cwd=str(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a background job (e.g. CI started with `&`) inherits SIGINT ignored, and Python then keeps
        # ignoring Ctrl-C: give the run the default disposition a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log_dir = workdir / "log" / "SASRec"
    deadline = time.time() + 180
    while time.time() < deadline:  # wait until epoch 1 has been validated
        logs = glob.glob(str(log_dir / "*.log"))
        if logs and "epoch 1 evaluating" in open(logs[0]).read():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    assert (workdir / "rec" / "run.running.json").exists()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    rec = json.load(open(workdir / "rec" / "run.interrupted.json"))
    assert rec["status"] == "interrupted" and (sig in rec["error"] or "KeyboardInterrupt" in rec["error"])
    assert rec["last_finished_epoch"] >= 1
    assert "rerun the same command" in rec["resume"]
    assert not record.exists() and not (workdir / "rec" / "run.running.json").exists()
    assert "interrupted:" in err and "Traceback" not in err
    if sig == "SIGTERM":
        assert "interrupted: stopped by SIGTERM" in err


def test_study_report_names_a_killed_cell(workdir):
    from recbole_mm import records
    from recbole_mm.study import collect_cells, validate_study

    write_tiny_dataset(workdir / "data")
    study = validate_study({"datasets": ["tiny"], "models": ["SASRec"], "seeds": [1],
                            "config": {"data_path": str(workdir / "data"), "epochs": 1}},
                           output_dir=str(workdir / "study"))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    record = study.cell_paths("tiny", "SASRec", 1)["record"]
    path = records.write_running(record)
    data = json.load(open(path))
    data["pid"] = proc.pid  # gone, as after the OOM killer
    json.dump(data, open(path, "w"))
    row = collect_cells(study)[0]
    assert row["status"] == "killed" and "OOM killer" in row["error"]


def test_numbers_are_accepted_where_the_default_is_a_number(workdir):
    """No false positives: a rate written as 0 in a YAML default still takes a fraction; an int
    where a float is the default is a number; sizes and budgets must be integers (torch layers
    refuse 16.0)."""
    write_tiny_dataset(workdir / "data")
    MMConfig(model="SASRec", dataset="tiny",
             config_dict=_cfg(workdir, attn_dropout_prob=0, learning_rate=1,
                              hidden_dropout_prob=0.25, topk=10, metrics="Hit", valid_metric="Hit@10"))
    for bad in (16.5, 16.0):
        with pytest.raises(ConfigError, match=f"hidden_size must be a positive integer, got {bad}"):
            MMConfig(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, hidden_size=bad))


def test_type_rule():
    from recbole_mm.validate import _type_ok

    assert _type_ok(0, 0.2) and _type_ok(0.5, 1) and _type_ok(64, None) and _type_ok("0", 1)
    assert not _type_ok(64, "abc") and not _type_ok(0.1, True) and not _type_ok(True, "yes")


class _MySASRec(__import__("recbole.model.sequential_recommender", fromlist=["SASRec"]).SASRec):
    """A user's own model class: the keys its file reads are known."""

    def __init__(self, config, dataset):
        self.my_gamma = config["my_gamma"]
        super().__init__(config, dataset)


def test_no_false_positives_for_own_models_and_recbole_conventions(workdir):
    write_tiny_dataset(workdir / "data")
    MMConfig(model=_MySASRec, dataset="tiny", config_dict=_cfg(workdir, my_gamma=0.5))
    # eval_step below 1 means "never validate" in RecBole; 0/1 for booleans as RecBole's cmd line gives them
    MMConfig(model="SASRec", dataset="tiny", config_dict=_cfg(workdir, eval_step=0, show_progress=0))


def test_default_text_fields_say_which_columns_they_leave_out(tmp_path, caplog):
    from recbole_mm.data.extract import read_item_texts

    path = tmp_path / "x.item"
    path.write_text("item_id:token\ttitle:token_seq\tyear:float\ni1\tRed Fish\t1999\ni2\tBlue Sky\t2001\n")
    with caplog.at_level(logging.WARNING, logger="recbole_mm"):
        tokens, texts = read_item_texts(str(path))
    assert texts == ["Red Fish", "Blue Sky"]
    assert "['year'] are left out" in caplog.text and "template: '{title} ({year})'" in caplog.text
    tokens, texts = read_item_texts(str(path), template="{title} ({year})")
    assert texts == ["Red Fish (1999)", "Blue Sky (2001)"]
