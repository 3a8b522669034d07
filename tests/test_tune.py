"""Hyper-parameter search over RecBole's HyperTuning, selecting on validation only."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import FAST, REPO, write_tiny_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("hyperopt")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_selection_uses_validation_scores_only(workdir):
    """Validation and test disagree on purpose: the trial with the best validation score has
    the worst test score, and it is still the one selected and ranked first."""
    from recbole_mm.tune import tune

    valid = {0.1: 0.30, 0.2: 0.10, 0.3: 0.20}
    test = {0.1: 0.05, 0.2: 0.50, 0.3: 0.25}
    calls = []

    def fake_objective(config_dict, config_file_list=None, saved=False):
        lr = config_dict["learning_rate"]
        calls.append(dict(config_dict))
        return {"model": "SASRec", "best_valid_score": valid[lr], "valid_score_bigger": True,
                "best_valid_result": {"ndcg@10": valid[lr]}, "test_result": {"ndcg@10": test[lr]}}

    params = workdir / "lr.hyper"
    params.write_text("learning_rate choice [0.1,0.2,0.3]\n")
    out = tune("SASRec", "tiny", params_file=str(params), algo="exhaustive", fixed={"epochs": 3},
               output_file=str(workdir / "res" / "search.md"), objective=fake_objective)
    assert len(calls) == 3
    assert all(c["epochs"] == 3 and c["model"] == "SASRec" and c["dataset"] == "tiny" for c in calls)
    assert out["best_params"] == {"learning_rate": 0.1}
    rows = _read_csv(out["csv"])
    assert [float(r["learning_rate"]) for r in rows] == [0.1, 0.3, 0.2]  # validation order
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    assert float(rows[0]["test_ndcg@10"]) == min(test.values())  # the selected trial tests worst
    with open(out["best_yaml"]) as f:
        best = yaml.safe_load(f)
    assert best == {"epochs": 3, "learning_rate": 0.1}
    md = open(out["output"]).read()
    assert "ranked by the **validation**" in md and md.index("| 1 | ") < md.index("| 2 | ")


def test_failed_trial_is_listed_and_does_not_stop_the_search(workdir):
    from recbole_mm.tune import tune

    def objective(config_dict, config_file_list=None, saved=False):
        if config_dict["hidden_size"] == 3:
            raise ValueError("hidden_size (3) must be a multiple of n_heads (2)")
        return {"model": "SASRec", "best_valid_score": 0.0, "valid_score_bigger": True,
                "best_valid_result": {"ndcg@10": 0.0}, "test_result": {"ndcg@10": 0.1}}

    params = workdir / "h.hyper"
    params.write_text("hidden_size choice [3,4]\n")
    out = tune("SASRec", "tiny", params_file=str(params), output_file=str(workdir / "s.md"),
               objective=objective)
    rows = _read_csv(out["csv"])
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "multiple of n_heads" in rows[1]["error"]
    assert out["best_params"] == {"hidden_size": 4}  # a best score of 0.0 is still a score


def test_two_trial_search_on_tiny_data_cli(workdir):
    """A real 2-trial TSSR search through ``run_recbole_mm.py tune``: the ranking is the
    ranking of the trials' validation scores (as their run records show), and the best
    configuration is a YAML that ``--config_files`` accepts."""
    from recbole_mm.config import MMConfig

    write_tiny_dataset(workdir / "data")
    cfg = dict(FAST, epochs=2, data_path=str(workdir / "data"))
    params = workdir / "lr.hyper"
    params.write_text("learning_rate choice [0.01,0.0001]\n")
    cmd = [sys.executable, os.path.join(REPO, "run_recbole_mm.py"), "tune", "--model=TSSR", "--dataset=tiny",
           f"--params_file={params}", "--output_file=hyper/search.md"] + [f"--{k}={v}" for k, v in cfg.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    rows = _read_csv(workdir / "hyper" / "search.csv")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    scores = [float(r["valid_score(NDCG@10)"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:  # the selection score is each run's best validation score, never a test metric
        with open(r["record"]) as f:
            record = json.load(f)
        assert float(r["valid_score(NDCG@10)"]) == pytest.approx(record["best_valid_score"])
        assert float(r["valid_ndcg@10"]) == pytest.approx(record["best_valid_result"]["ndcg@10"])
        assert float(r["test_ndcg@10"]) == pytest.approx(record["test_result"]["ndcg@10"])
        assert record["config"]["learning_rate"] == float(r["learning_rate"])
    best_yaml = workdir / "hyper" / "search.best.yaml"
    config = MMConfig(model="TSSR", dataset="tiny", config_file_list=[str(best_yaml)])
    assert config["learning_rate"] == float(rows[0]["learning_rate"])
    assert config["epochs"] == 2 and config["hidden_size"] == FAST["hidden_size"]
    assert "best config" in proc.stdout


@pytest.mark.parametrize("model", ["TSSR", "SICSRec"])
def test_shipped_search_spaces_parse_and_name_real_keys(model, workdir):
    from recbole.trainer.hyper_tuning import HyperTuning

    from recbole_mm.config import MMConfig, properties_dir
    from recbole_mm.tune import default_params_file

    path = default_params_file(model)
    assert path == os.path.join(properties_dir(), "hyper", f"{model}.hyper")
    space = HyperTuning._build_space_from_file(path)
    assert len(space) >= 3
    try:
        config = MMConfig(model=model, dataset="ml-100k", config_dict={"data_path": str(workdir / "d")})
    except Exception as exc:  # noqa: BLE001 - a model being developed elsewhere may not import
        pytest.skip(f"{model} config unavailable: {exc}")
    missing = [k for k in space if k not in config.final_config_dict]
    assert not missing, f"{path} names keys {model} does not have: {missing}"
    with open(os.path.join(REPO, "setup.cfg")) as f:
        assert "hyper/*" in f.read()  # installed with the package
