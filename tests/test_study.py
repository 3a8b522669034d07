"""YAML studies: a tiny study end to end (tables, CSV/JSON, plots), resuming after an
interruption without rerunning finished cells, and validation before any training."""

import csv
import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest

from recbole_mm import study as st
from recbole_mm.study import StudyError, run_study, validate_study

from conftest import FAST, REPO, write_tiny_dataset

CELL_CONFIG = "\n".join(f"  {k}: {v}" for k, v in FAST.items() if k != "seed")

TINY_STUDY = f"""\
name: tiny
datasets: [tiny]
models: [SASRec, GRU4Rec]
proposed: [GRU4Rec]
seeds: [1, 2]
metrics: [Hit, NDCG]
topk: [5, 10]
config:
  data_path: data
{CELL_CONFIG}
model_config:
  GRU4Rec: {{embedding_size: 16}}
keep_checkpoints: false
"""


@pytest.fixture
def env(workdir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # cells are subprocesses; keep them light on a shared CPU
    monkeypatch.delenv("RECBOLE_MM_NINEREC_DIR", raising=False)
    write_tiny_dataset(workdir / "data")
    return workdir


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def line_of(text, needle):
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# ----------------------------------------------------------------------------- end to end


def _cell_processes(marker):
    """Live processes whose command line contains ``marker`` (Linux /proc)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def test_tiny_study_killed_and_resumed_without_rerunning_and_reports(env):
    path = write(env / "tiny.yaml", TINY_STUDY)
    out = str(env / "studies" / "tiny")
    first = os.path.join(out, "records", "tiny", "SASRec", "seed1.json")

    # run 1, from the command line: killed (SIGKILL) as soon as the first cell's record exists
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "run_recbole_mm.py"), "--study", path,
                             "--no-progress"], cwd=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.path.exists(first), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
    proc.kill()
    proc.wait()
    proc.stderr.close()
    deadline = time.monotonic() + 20  # the running cell dies with the study (no orphan keeps running)
    while _cell_processes(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _cell_processes(out)
    stat1, bytes1 = os.stat(first), open(first, "rb").read()
    assert json.loads(bytes1)["status"] == "finished" and json.loads(bytes1)["seed"] == 1

    # a corrupt record (e.g. a disk that filled up) is not a finished cell
    gru = env / out / "records" / "tiny" / "GRU4Rec"
    write(gru / "seed1.json", '{"status": "finished", "test_res')
    status = {(r["model"], r["seed"]): r["status"] for r in st.collect_cells(validate_study(path))}
    assert status[("SASRec", 1)] == "finished" and status[("GRU4Rec", 1)] == "pending"
    assert status[("SASRec", 2)] in ("interrupted", "pending")  # killed while running, or not started yet

    # run 2: max_cells=1 runs exactly one more cell; run 3 completes the rest
    r2 = run_study(path, max_cells=1, progress=False)
    assert r2["counts"] == {"finished": 2, "pending": 2} and not r2["complete"]
    r3 = run_study(path, progress=False)
    assert r3["complete"] and r3["counts"] == {"finished": 4}
    # the first cell was never run again and its record never written
    assert os.stat(first).st_mtime_ns == stat1.st_mtime_ns and open(first, "rb").read() == bytes1
    sas = os.path.join(out, "records", "tiny", "SASRec")
    attempts = json.load(open(os.path.join(sas, "seed1.cell.json")))["attempts"]
    assert len(attempts) == 1  # one attempt (the study may have been killed before noting its end)
    assert open(os.path.join(out, "logs", "tiny", "SASRec", "seed1.log")).read().count("attempt at") == 1
    assert glob.glob(str(gru / "seed1.json.incomplete-*"))  # the broken record was kept aside, not overwritten
    assert json.load(open(gru / "seed1.json"))["status"] == "finished"
    assert not glob.glob(os.path.join(out, "saved", "**", "*.pth"), recursive=True)  # keep_checkpoints: false

    # cells.csv / cells.json: every cell with its metrics and wall time
    with open(os.path.join(out, "cells.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    assert {(r["model"], r["seed"]) for r in rows} == {("SASRec", "1"), ("SASRec", "2"), ("GRU4Rec", "1"), ("GRU4Rec", "2")}
    for r in rows:
        assert 0 <= float(r["test_hit@10"]) <= 1 and float(r["wall_time_s"]) > 0 and r["epochs"] == "1"
    cells = json.load(open(os.path.join(out, "cells.json")))["cells"]
    assert len(cells) == 4 and all("hit@5" in c["test"] and c["valid_curve"] for c in cells)

    # the table: mean ± std, best in bold, improvement over the best baseline with a paired t-test
    table = open(os.path.join(out, "tables", "tiny.md")).read()
    assert ("| Model | Role | n | HR@5: mean ± std (± 95% CI) | HR@10: mean ± std (± 95% CI) | NDCG@5: mean ± std "
            "(± 95% CI) | NDCG@10: mean ± std (± 95% CI) | epochs | s / training epoch | peak memory | "
            "wall time / cell |") in table
    sas_line = next(line for line in table.splitlines() if line.startswith("| SASRec |"))
    epochs, epoch_s, peak = sas_line.split(" | ")[-4:-1]
    assert epochs == "1 (cap)" and sas_line.endswith(" s |")  # epochs 1 of 1; seconds per cell
    assert epoch_s.endswith(" s") and peak.endswith(" GiB")  # every cell's record has both
    lo_peak = float(peak.split()[0].split("-")[0])
    assert 0.1 < lo_peak < 16  # a real process's peak resident memory, in GiB
    assert "±" in table and table.count("**") >= 8  # 4 metrics, each best value bold
    assert "vs SASRec (p=" in table and ", n=2)" in table
    results = open(os.path.join(out, "results.md")).read()
    assert "## tiny" in results and "## Wall time per cell" in results and "machine:" in results
    ran_on = next(line for line in results.splitlines() if line.startswith("- cells ran on: "))
    assert "(cpu, torch " in ran_on and ran_on.endswith(": 4 cells")
    assert results.count("| tiny | ") == 4 and "| SASRec | baseline | 2 | " in results  # wall times + table
    for name in ("tiny_metrics.png", "tiny_valid.png"):
        png = os.path.join(out, "plots", name)
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 5000

    # run 3 runs nothing and changes no record; the CLI rebuilds the report the same way
    mtimes = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "records", "*", "*", "seed?.json"))}
    assert run_study(path, progress=False)["counts"] == {"finished": 4}
    from recbole_mm.__main__ import main

    assert main(["--study", path, "--report-only", "--no-progress"]) == 0
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes

    # a changed configuration never mixes with finished cells: refused before anything runs
    with pytest.raises(StudyError, match="different configuration") as exc:
        run_study(path, overrides={"epochs": 2}, progress=False)
    assert "epochs: 1 -> 2" in str(exc.value)


# ----------------------------------------------------------------------------- validation


def assert_fails_before_training(path, workdir, *expected):
    with pytest.raises(StudyError) as exc:
        run_study(path, progress=False)
    message = str(exc.value)
    for line, *words in expected:
        hit = [m for m in message.splitlines() if f"{path}:{line}:" in m]
        assert hit, f"no error on line {line}:\n{message}"
        for w in words:
            assert w in hit[0], f"{w!r} not in {hit[0]!r}"
    assert not (workdir / "studies").exists() and not (workdir / "log").exists()  # nothing ran, nothing written
    return message


def test_unknown_model_key_and_reserved_key_name_their_lines(env):
    text = """\
name: bad
datasets: [tiny]
models:
  - SASRec
  - SASRek
seeds: [1]
seed: 3
config:
  data_path: data
  model: SASRec
model_config:
  NARM: {hidden_size: 8}
"""
    path = write(env / "bad.yaml", text)
    message = assert_fails_before_training(
        path, env,
        (5, "Unknown model 'SASRek'", "SASRec"),
        (7, "unknown key 'seed'", "did you mean seeds"),
        (10, "config.model", "cannot be overridden"),
        (12, "model_config.NARM", "not one of the study's models"),
    )
    assert message.startswith("invalid study (4 problems)")


def test_unknown_dataset_names_its_line(env):
    text = """\
datasets: [tiny, nosuch, Bili_Nope]
models: [SASRec]
config:
  data_path: data
sources:
  Bili_Nope: {type: ninerec, path: raw/missing}
"""
    path = write(env / "bad.yaml", text)
    assert_fails_before_training(
        path, env,
        (1, "datasets[1]", "'nosuch' not found", "no source"),
        (6, "sources.Bili_Nope", "source is missing", "raw/missing"),
    )


def test_unknown_config_keys_name_their_lines(env):
    text = """\
datasets: [tiny]
models: [SASRec, GRU4Rec]
config:
  data_path: data
  epoch: 1
model_config:
  SASRec:
    hiden_size: 8
  GRU4Rec: {num_layers: 1}
"""
    path = write(env / "bad.yaml", text)
    assert_fails_before_training(
        path, env,
        (5, "config.epoch", "unknown config key", "did you mean epochs"),
        (8, "model_config.SASRec.hiden_size", "hidden_size"),
    )
    # strict_keys: false turns them into warnings
    relaxed = validate_study(write(env / "ok.yaml", text + "strict_keys: false\n"))
    assert len(relaxed.errors.warnings) == 2 and relaxed.cells == [("tiny", "SASRec", 2020), ("tiny", "GRU4Rec", 2020)]


def test_yaml_errors_name_their_lines(env):
    path = write(env / "dup.yaml", "datasets: [tiny]\nmodels: [SASRec]\nmodels: [GRU4Rec]\n")
    with pytest.raises(StudyError, match=r"dup.yaml:3: .*duplicate key 'models' \(first on line 2\)"):
        validate_study(path)
    path = write(env / "syntax.yaml", "datasets: [tiny\nmodels: [SASRec]\n")
    with pytest.raises(StudyError, match=r"syntax.yaml:\d+: YAML error"):
        validate_study(path)
    with pytest.raises(StudyError, match="missing: the study needs a list of models"):
        validate_study({"datasets": ["tiny"], "config": {"data_path": "data"}})


def test_cell_config_priority_and_paths(env):
    text = TINY_STUDY + "dataset_config:\n  tiny: {epochs: 3, learning_rate: 1e-2}\n"
    text = text.replace("  GRU4Rec: {embedding_size: 16}", "  GRU4Rec: {embedding_size: 16, epochs: 4}")
    s = validate_study(write(env / "p.yaml", text), overrides={"eval_batch_size": 32})
    sas, gru = s.cell_spec("tiny", "SASRec", 2), s.cell_spec("tiny", "GRU4Rec", 1)
    assert sas["config_dict"]["epochs"] == 3 and gru["config_dict"]["epochs"] == 4  # dataset < model
    assert sas["config_dict"]["learning_rate"] == 0.01  # 1e-2 read as a float, as RecBole does
    assert sas["config_dict"]["eval_batch_size"] == 32  # the command line beats the YAML
    assert sas["config_dict"]["seed"] == 2 and sas["config_dict"]["data_path"] == str(env / "data")
    assert sas["config_dict"]["record_path"] == str(env / "studies" / "tiny" / "records" / "tiny" / "SASRec" / "seed2.json")
    assert sas["fingerprint"] != s.cell_spec("tiny", "SASRec", 1)["fingerprint"]


# ----------------------------------------------------------------------------- model variants

VARIANT_STUDY = TINY_STUDY.replace("models: [SASRec, GRU4Rec]\n", """\
models:
  - SASRec
  - {name: SASRec+bucketing, model: sasrec, config: {length_bucketing: True, inner_size: 48}}
  - GRU4Rec
""").replace("  GRU4Rec: {embedding_size: 16}\n", """\
  GRU4Rec: {embedding_size: 16}
  SASRec: {inner_size: 24, n_layers: 2}
  SASRec+bucketing: {n_layers: 3, inner_size: 40}
""")


def test_a_variant_cell_runs_its_model_with_the_merged_config(env):
    s = validate_study(write(env / "v.yaml", VARIANT_STUDY), overrides={"eval_batch_size": 32})
    assert s.models == ["SASRec", "SASRec+bucketing", "GRU4Rec"] and len(s.cells) == 6
    assert s.proposed == ["GRU4Rec"]  # a SASRec variant is a baseline, as SASRec is
    spec = s.cell_spec("tiny", "SASRec+bucketing", 2)
    assert (spec["model"], spec["name"]) == ("SASRec", "SASRec+bucketing")  # the runner gets the real model
    cfg = spec["config_dict"]
    # study config < model_config of its model < model_config of the variant < the variant's config < command line
    assert (cfg["length_bucketing"], cfg["inner_size"], cfg["n_layers"], cfg["hidden_size"], cfg["eval_batch_size"]) \
        == (True, 48, 3, 16, 32)
    assert cfg["record_path"] == str(env / "studies" / "tiny" / "records" / "tiny" / "SASRec+bucketing" / "seed2.json")
    assert cfg["checkpoint_dir"] == str(env / "studies" / "tiny" / "saved" / "tiny" / "SASRec+bucketing")
    plain = s.cell_spec("tiny", "SASRec", 2)["config_dict"]
    assert "length_bucketing" not in plain and (plain["inner_size"], plain["n_layers"]) == (24, 2)
    # role: proposed makes it one; naming a base model in `proposed` makes its variants proposed too
    role = VARIANT_STUDY.replace("inner_size: 48}}", "inner_size: 48}, role: proposed}")
    assert validate_study(write(env / "p.yaml", role)).proposed == ["GRU4Rec", "SASRec+bucketing"]
    listed = VARIANT_STUDY.replace("proposed: [GRU4Rec]", "proposed: [SASRec]")
    assert validate_study(write(env / "q.yaml", listed)).proposed == ["SASRec", "SASRec+bucketing"]

    # a finished variant cell is found (its record names SASRec), and a changed variant config is refused
    _finish_cell_as(s, ("tiny", "SASRec+bucketing", 1), s.cell_spec("tiny", "SASRec+bucketing", 1))
    rows = {(r["model"], r["seed"]): r for r in st.collect_cells(s)}
    assert rows["SASRec+bucketing", 1]["status"] == "finished" and rows["SASRec", 1]["status"] == "pending"
    changed = write(env / "v.yaml", VARIANT_STUDY.replace("length_bucketing: True", "length_bucketing: False"))
    with pytest.raises(StudyError, match="different configuration") as exc:
        run_study(changed, overrides={"eval_batch_size": 32}, max_cells=0, progress=False)
    assert "tiny / SASRec+bucketing / seed 1: length_bucketing: True -> False" in str(exc.value)
    retargeted = write(env / "v.yaml", VARIANT_STUDY.replace("model: sasrec,", "model: GRU4Rec,"))
    with pytest.raises(StudyError, match="model: 'SASRec' -> 'GRU4Rec'"):
        run_study(retargeted, overrides={"eval_batch_size": 32}, max_cells=0, progress=False)


def test_a_variant_cell_runs_end_to_end(env):
    """One tiny cell: the runner trains the variant's model with its config; the record (which
    names SASRec) is the finished cell of the variant's label. A variant cell gets no step-1 share
    folder (SICSRec's step-1 key does not cover every setting a variant may change)."""
    text = VARIANT_STUDY.replace("  - SASRec\n", "", 1).replace("  - GRU4Rec\n", "").replace("proposed: [GRU4Rec]\n", "")
    text = text.replace("  GRU4Rec: {embedding_size: 16}\n", "")  # model_config.SASRec still applies to the variant
    text = text.replace("keep_checkpoints: false", "keep_checkpoints: true")
    r = run_study(write(env / "v.yaml", text.replace("seeds: [1, 2]", "seeds: [1]")), progress=False)
    assert r["complete"] and [(c["model"], c["status"]) for c in r["cells"]] == [("SASRec+bucketing", "finished")]
    record = json.load(open(os.path.join(r["output_dir"], "records", "tiny", "SASRec+bucketing", "seed1.json")))
    assert record["model"] == "SASRec" and record["config"]["length_bucketing"] is True
    assert (record["config"]["inner_size"], record["config"]["n_layers"]) == (48, 3)
    assert not record.get("published") and not os.path.exists(os.path.join(r["output_dir"], "saved", "step1"))


def test_variant_mistakes_name_their_lines(env):
    text = """\
datasets: [tiny]
models:
  - SASRec
  - name: fast
    model: SASRec
    config: {length_bucketin: True}
  - {name: fast, model: GRU4Rec}
  - {name: slow, model: SASRek}
  - {name: gru4rec, model: SASRec}
  - {name: odd, model: SASRec, role: main}
  - {name: odder, model: SASRec, configs: {}}
config:
  data_path: data
"""
    path = write(env / "bad.yaml", text)
    message = assert_fails_before_training(
        path, env,
        (6, "models[1].config.length_bucketin", "unknown config key", "did you mean length_bucketing"),
        (7, "models[2]", "'fast' is listed twice"),
        (8, "models[3].model", "Unknown model 'SASRek'", "SASRec"),
        (9, "models[4].name", "is the name of the model GRU4Rec"),
        (10, "models[5].role", "must be baseline or proposed"),
        (11, "models[6].configs", "unknown key for a model variant", "did you mean config"),
    )
    assert message.startswith("invalid study (6 problems)")
    bad_value = text.split("  - {name: fast")[0].replace("length_bucketin: True", "length_bucketing: 3")
    with pytest.raises(StudyError, match=r"bad2.yaml:6: models\[1\]\.config\.length_bucketing: length_bucketing must"):
        validate_study(write(env / "bad2.yaml", bad_value + "config:\n  data_path: data\n"))


def test_variants_section_pairs_each_variant_with_its_base_model(env):
    """A fabricated study: the variant against its base model per seed, with a paired t-test
    checked by hand (3 pairs: two-sided p = 1 - t / sqrt(t^2 + 2) for 2 degrees of freedom)."""
    s = validate_study(write(env / "v.yaml", VARIANT_STUDY.replace("seeds: [1, 2]", "seeds: [1, 2, 3]")))
    values = {"SASRec": [(0.30, 0.20), (0.32, 0.21), (0.31, 0.22)],
              "SASRec+bucketing": [(0.31, 0.25), (0.34, 0.27), (0.30, 0.26)],
              "GRU4Rec": [(0.20, 0.10), (0.21, 0.11), (0.22, 0.12)]}
    rows = [{"dataset": "tiny", "model": m, "seed": seed, "status": "finished", "wall_time_s": wall,
             "test": {"hit@10": hit, "ndcg@10": ndcg}}
            for m, per_seed in values.items() for (seed, (hit, ndcg)), wall in zip(enumerate(per_seed, 1), (60, 65, 70))]
    text = st.variants_table(s, rows, "tiny", ["hit@10", "ndcg@10"])
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "SASRec+bucketing: SASRec with `inner_size: 48, length_bucketing: True, n_layers: 3`" in text
    # mean ± std (± 95% CI half-width: t(0.975, 2) = 4.3027, 4.3027 * 0.01 / sqrt(3) = 0.0248)
    assert lines["| SASRec"] == "| SASRec | 3 | 0.3100 ± 0.0100 (± 0.0248) | 0.2100 ± 0.0100 (± 0.0248) | — | 60-70 s |"
    assert lines["| SASRec+bucketing"] == \
        "| SASRec+bucketing | 3 | 0.3167 ± 0.0208 (± 0.0517) | 0.2600 ± 0.0100 (± 0.0248) | — | 60-70 s |"
    # hit@10: differences 0.01, 0.02, -0.01, t = 2 / sqrt(7), p = 1 - sqrt(2) / 3 = 0.529
    # ndcg@10: differences 0.05, 0.06, 0.04, t = 5 sqrt(3), p = 1 - sqrt(75 / 77) = 0.0131
    # Holm over this table's 2 comparisons: 2 * 0.013072 = 0.0261, max(0.0261, 1 * 0.529) = 0.529
    assert lines["| SASRec+bucketing vs SASRec"] == ("| SASRec+bucketing vs SASRec | | +2.2% (p=0.529, p_Holm=0.529, "
                                                     "n=3) | +23.8% (p=0.0131, p_Holm=0.0261, n=3) | | |")
    c = st._paired_metric({r["seed"]: r["test"] for r in rows if r["model"] == "SASRec+bucketing"},
                          {r["seed"]: r["test"] for r in rows if r["model"] == "SASRec"}, "hit@10")
    assert c["p"] == pytest.approx(1 - 2 ** 0.5 / 3) and st.within_seed_noise(c)
    # within seed noise on HR@10 (p >= 0.05, |0.0067| <= std 0.01), not on NDCG@10 (p < 0.05)
    assert "- SASRec+bucketing: **not** within seed noise of SASRec on NDCG@10; within it on HR@10." in text
    assert "p ≥ 0.05" in text and "one standard deviation of the base model" in text
    one_seed = [r for r in rows if r["seed"] == 1]
    assert "fewer than 2 seeds finished by both it and SASRec: no verdict" in st.variants_table(s, one_seed, "tiny",
                                                                                                   ["hit@10"])
    # the variant is a row of the dataset table like any model (here the best baseline); a study
    # without variants has no section
    table, _ = st.dataset_table(s, rows, "tiny", ["hit@10"])
    assert "| SASRec+bucketing | baseline | 3 | **0.3167 ± 0.0208 (± 0.0517)** |" in table
    assert "vs SASRec+bucketing (p=" in table
    assert st.variants_table(validate_study(write(env / "t.yaml", TINY_STUDY)), rows, "tiny", ["hit@10"]) == ""


# ----------------------------------------------------------------------------- datasets


def write_ninerec(folder, name):
    folder.mkdir(parents=True)
    (folder / "sequential_data.txt").write_text(
        "\n".join(f"{u} " + " ".join(str((u + k) % 8) for k in range(5)) for u in range(6)) + "\n")
    (folder / f"{name}_item.csv").write_text("".join(f'{i},标题{i},"title {i}"\n' for i in range(8)))


def test_missing_datasets_are_built_from_their_source(env, monkeypatch):
    write_ninerec(env / "raw" / "Foo", "Foo")
    text = "datasets: [Foo, Bili_Tiny]\nmodels: [SASRec]\nconfig: {data_path: data}\n" \
           "sources:\n  Foo: {type: ninerec, path: raw/Foo}\n"
    path = write(env / "src.yaml", text)
    with pytest.raises(StudyError, match=r"src.yaml:1: datasets\[1\]: .*Bili_Tiny.*RECBOLE_MM_NINEREC_DIR"):
        validate_study(path)
    write_ninerec(env / "nine" / "Bili_Tiny", "Bili_Tiny")
    monkeypatch.setenv("RECBOLE_MM_NINEREC_DIR", str(env / "nine"))  # the default source of Bili_* names
    s = validate_study(path)
    assert s.to_build == {"Foo": dict(type="ninerec", path=str(env / "raw" / "Foo"), _line=5),
                          "Bili_Tiny": dict(type="ninerec", path=str(env / "nine" / "Bili_Tiny"))}
    st._prepare_datasets(s, lambda msg: None)
    for d in ("Foo", "Bili_Tiny"):
        assert os.path.isfile(env / "data" / d / f"{d}.inter") and os.path.isfile(env / "data" / d / f"{d}.item")
    assert validate_study(path).to_build == {}


def test_shipped_studies_validate(env):
    have_sicsrec = importlib.util.find_spec("recbole_mm.model.sicsrec") is not None
    quick = os.path.join(REPO, "properties", "study", "quickstart.yaml")
    bili = os.path.join(REPO, "properties", "study", "bili.yaml")
    checks = [(quick, 4, ["SASRec", "BERT4Rec", "TSSR", "SICSRec"])]
    shared = os.path.join(REPO, "..", "shared", "data", "ninerec_bili", "Bili_Food")
    if os.path.isdir(shared):
        checks.append((bili, 84, ["SASRec", "BERT4Rec", "GRU4Rec", "ContentSASRec", "IDContentSASRec", "TSSR", "SICSRec"]))
    validated = {}
    for path, n_cells, models in checks:
        if not have_sicsrec:  # SICSRec lands separately: until then the study names its line
            with pytest.raises(StudyError, match=rf"{os.path.basename(path)}:\d+: models\[\d\]: Unknown model 'SICSRec'"):
                validate_study(path)
            continue
        s = validated[path] = validate_study(path)
        assert len(s.cells) == n_cells and s.models == models and s.proposed == ["TSSR", "SICSRec"]
        assert not s.errors.warnings
        if path == bili:
            assert s.report == ["hit@5", "hit@10", "ndcg@5", "ndcg@10"] and s.seeds == [2020, 2021, 2022]
            assert set(s.to_build) == {"Bili_Food", "Bili_Dance", "Bili_Movie", "Bili_Cartoon"}
    if os.path.isdir(shared) and have_sicsrec:
        # bili_cpu.yaml is the bili study sized for a CPU: same models, seeds and metrics on two
        # of its datasets, and the same cell config as sicsrec_bili_cpu.yaml (the docs say its
        # SICSRec and TSSR cells are the same runs)
        full, cpu = validated[bili], validate_study(os.path.join(REPO, "properties", "study", "bili_cpu.yaml"))
        assert (cpu.models, cpu.seeds, cpu.report, cpu.proposed) == (full.models, full.seeds, full.report, full.proposed)
        assert len(cpu.cells) == 42 and set(cpu.to_build) == {"Bili_Food", "Bili_Dance"}
        assert cpu.config["valid_metric"] == full.config["valid_metric"] == "Hit@10"
        sics = validate_study(os.path.join(REPO, "properties", "study", "sicsrec_bili_cpu.yaml"))
        assert cpu.config == sics.config
        for model in ("SICSRec", "TSSR"):
            assert cpu.model_config[model] == sics.model_config[model]


# ----------------------------------------------------------------------------- tables


def fake_rows(values):
    """values: model -> list of per-seed hit@10 (None = cell not finished)."""
    rows = []
    for model, per_seed in values.items():
        for seed, v in enumerate(per_seed, 1):
            rows.append({"dataset": "d", "model": model, "seed": seed,
                         "status": "finished" if v is not None else "failed",
                         "test": {} if v is None else {"hit@10": v, "averagepopularity@10": 10 * v}})
    return rows


def test_table_statistics():
    from scipy import stats

    study = types.SimpleNamespace(models=["SASRec", "GRU4Rec", "TSSR"], proposed=["TSSR"], seeds=[1, 2, 3])
    rows = fake_rows({"SASRec": [0.30, 0.32, 0.31], "GRU4Rec": [0.20, 0.22, 0.21], "TSSR": [0.33, 0.36, None]})
    text, summary = st.dataset_table(study, rows, "d", ["hit@10", "averagepopularity@10"])
    c = summary["comparisons"]["TSSR", "hit@10"]
    assert c["baseline"] == "SASRec" and c["n"] == 2  # paired over the seeds both finished
    assert c["p"] == pytest.approx(stats.ttest_rel([0.33, 0.36], [0.30, 0.32]).pvalue)
    assert c["relative_pct"] == pytest.approx((0.345 - 0.31) / 0.31 * 100)
    assert "| TSSR | proposed | 2 | **0.3450 ± 0.0212 (± 0.1906)** |" in text
    assert "+11.3% vs SASRec (p=" in text
    # smaller-is-better metric (RecBole's smaller_metrics): the best is the smallest mean
    assert "**2.1000 ± 0.1000 (± 0.2484)**" in text and summary["best_baseline"]["averagepopularity@10"] == "GRU4Rec"
    # one seed: no std, no test
    one = types.SimpleNamespace(models=["SASRec", "TSSR"], proposed=["TSSR"], seeds=[1])
    text1, s1 = st.dataset_table(one, fake_rows({"SASRec": [0.3], "TSSR": [0.2]}), "d", ["hit@10"])
    assert "| SASRec | baseline | 1 | **0.3000 (n/a)** |" in text1 and "| TSSR | proposed | 1 | 0.2000 (n/a) |" in text1
    assert "-33.3% vs SASRec (p=n/a, n=1)" in text1
    assert "TSSR: beats the best baseline on no metric; does **not** beat it on HR@10" in text1


# ----------------------------------------------------------------------------- parallel cells


def _hold_lock(folder, name, hold_s, log_path):
    from recbole_mm.data.features import FeatureStore

    with FeatureStore(folder, "tiny").build_lock(name):
        with open(log_path, "a") as f:
            f.write(f"in {time.monotonic():.6f}\n")
        time.sleep(hold_s)
        with open(log_path, "a") as f:
            f.write(f"out {time.monotonic():.6f}\n")


def test_feature_build_lock_serialises_processes(tmp_path):
    """Two processes building the same feature never hold its lock at the same time."""
    import multiprocessing as mp

    log = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hold_lock, args=(str(tmp_path), "text", 0.6, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["in", "out", "in", "out"]  # never in, in
    assert float(events[2][1]) >= float(events[1][1])


def test_parallel_study_runs_cells_at_once_and_reports(env):
    text = TINY_STUDY.replace("models: [SASRec, GRU4Rec]", "models: [SASRec]").replace("proposed: [GRU4Rec]\n", "")
    path = write(env / "tiny.yaml", text.split("model_config:")[0] + "keep_checkpoints: false\n")
    r = run_study(path, progress=False, jobs=2)
    assert r["complete"] and r["counts"] == {"finished": 2}
    out = r["output_dir"]
    spans = []
    for seed in (1, 2):
        attempt = json.load(open(os.path.join(out, "records", "tiny", "SASRec", f"seed{seed}.cell.json")))["attempts"]
        assert len(attempt) == 1 and attempt[0]["status"] == "finished"
        spans.append(attempt[0])
    # each cell tested its own best checkpoint (RecBole's names are per second: seeds started
    # together used to share one file)
    ckpts = {json.load(open(os.path.join(out, "records", "tiny", "SASRec", f"seed{seed}.json")))["checkpoint"]
             for seed in (1, 2)}
    assert len(ckpts) == 2 and None not in ckpts
    # both cells were running at the same moment: each started before the other ended
    starts = sorted(s["started"] for s in spans)
    ends = sorted(s["ended"] for s in spans)
    assert starts[1] <= ends[0]
    assert os.path.isfile(os.path.join(out, "tables", "tiny.md"))
    from recbole_mm.__main__ import main

    assert main(["--study", path, "--jobs", "0"]) == 2  # refused, clear message


@pytest.mark.parametrize("target", ["study", "process group"])
def test_sigterm_stops_a_parallel_study_keeping_finished_cells_and_the_report(env, target):
    """SIGTERM to the study process (``timeout``, ``kill``) or to its whole process group (a batch
    scheduler, Ctrl-C's terminal): running cells are interrupted, not failed, and none starts after."""
    text = TINY_STUDY.replace("seeds: [1, 2]", "seeds: [1, 2, 3]")
    path = write(env / "tiny.yaml", text)
    out = str(env / "studies" / "tiny")
    first = os.path.join(out, "records", "tiny", "SASRec", "seed1.json")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "run_recbole_mm.py"), "--study", path,
                             "--jobs", "2", "--no-progress"], cwd=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not os.path.exists(first):
        proc.kill()
        logs = "".join(open(p).read()[-1500:] for p in glob.glob(os.path.join(out, "logs", "*", "*", "*.log")))
        pytest.fail(f"no record after the first cell; study exit {proc.poll()}; stderr:\n"
                    f"{proc.stderr.read().decode()[-2000:]}\ncell logs:\n{logs}")
    if target == "study":
        proc.terminate()  # SIGTERM, as `timeout` sends it
    else:
        os.killpg(proc.pid, signal.SIGTERM)  # the cells get it too, possibly before the study does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 143), err.decode()[-2000:]  # 0 if every cell finished first
    deadline = time.monotonic() + 20
    while _cell_processes(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _cell_processes(out)  # no cell outlives the study
    assert os.path.isfile(os.path.join(out, "results.md"))  # the report was still written
    rows = {(r["model"], r["seed"]): r["status"] for r in json.load(open(os.path.join(out, "cells.json")))["cells"]}
    assert rows[("SASRec", 1)] == "finished"
    # every attempt ended finished or interrupted (stopped cells rerun; none failed or began after the signal)
    attempts = [a for f in glob.glob(os.path.join(out, "records", "*", "*", "*.cell.json"))
                for a in json.load(open(f))["attempts"]]
    assert attempts and {a["status"] for a in attempts} <= {"finished", "interrupted"}, attempts
    assert set(rows.values()) <= {"finished", "interrupted", "pending"}, rows
    before = open(first, "rb").read()
    r = run_study(path, progress=False, jobs=2)
    assert r["complete"] and open(first, "rb").read() == before


def _finish_cell_as(study, cell, spec):
    """Mark ``cell`` finished with ``spec`` as its recorded configuration (no training)."""
    paths = study.cell_paths(*cell)
    os.makedirs(os.path.dirname(paths["record"]), exist_ok=True)
    d, _, s = cell
    with open(paths["record"], "w") as f:
        json.dump({"status": "finished", "dataset": d, "model": spec["model"], "seed": s, "test_result": {"hit@10": 0.5},
                   "best_valid_result": {"hit@10": 0.5}}, f)
    with open(paths["cell"], "w") as f:
        json.dump(spec, f, default=str)


def test_a_changed_default_is_refused_on_resume_unless_pinned_to_its_old_value(env):
    """A default changed in a model YAML (plugin or RecBole) between runs of a study is caught:
    the cells that ran with the old value are named, before anything runs."""
    path = write(env / "tiny.yaml", TINY_STUDY)
    study = validate_study(path)
    cell = ("tiny", "SASRec", 1)
    spec = study.cell_spec(*cell)
    assert spec["defaults"]["hidden_dropout_prob"] == 0.5  # RecBole's SASRec.yaml

    # unchanged: the study resumes (runs nothing here: max_cells=0)
    _finish_cell_as(study, cell, spec)
    assert run_study(path, max_cells=0, progress=False)["counts"]["finished"] == 1

    # the study folder came from a machine whose datasets were elsewhere: a location, not a change
    moved = json.loads(json.dumps(spec, default=str))
    moved["user_config"]["data_path"] = "/elsewhere/dataset"
    _finish_cell_as(study, cell, moved)
    assert run_study(path, max_cells=0, progress=False)["counts"]["finished"] == 1

    # the cell ran when the default was 0.3 (as if SASRec.yaml changed since): refused, the key named
    old = json.loads(json.dumps(spec, default=str))
    old["defaults"]["hidden_dropout_prob"] = 0.3
    _finish_cell_as(study, cell, old)
    with pytest.raises(StudyError, match="different configuration") as exc:
        run_study(path, max_cells=0, progress=False)
    assert "tiny / SASRec / seed 1: hidden_dropout_prob: 0.3 -> 0.5 (a default)" in str(exc.value)
    assert "set its old value" in str(exc.value)

    # pinning the old value in the study makes the configurations equal again: accepted
    pinned = write(env / "pinned.yaml", TINY_STUDY.replace("model_config:\n", "model_config:\n  SASRec: {hidden_dropout_prob: 0.3}\n"))
    assert run_study(pinned, output_dir=str(env / "studies" / "tiny"), max_cells=0,
                     progress=False)["counts"]["finished"] == 1

    # cells recorded before defaults were snapshotted compare on the fingerprint, as before
    legacy = {k: v for k, v in old.items() if k not in ("defaults", "config_file_shas")}
    _finish_cell_as(study, cell, legacy)
    assert run_study(path, max_cells=0, progress=False)["counts"]["finished"] == 1


def test_a_cell_refuses_to_start_when_its_defaults_changed_since_the_study_started(env):
    """Cells read the YAML files when they start: one that would see a default or config file
    changed since the study started (and so differ from the cells already run) refuses, clearly."""
    conf = write(env / "extra.yaml", "learning_rate: 0.002\n")
    path = write(env / "tiny.yaml", TINY_STUDY.replace("name: tiny\n", f"name: tiny\nconfig_files: [{conf}]\n"))
    study = validate_study(path)
    spec = study.cell_spec("tiny", "SASRec", 1)
    assert st.changed_since_study_start(spec) == []

    spec["defaults"]["hidden_dropout_prob"] = 0.3  # the snapshot at study start said 0.3; the file says 0.5 now
    spec["defaults"]["n_heads"] = 4  # set by the study itself: a change of its default does not matter
    with open(conf, "a") as f:
        f.write("weight_decay: 0.0\n")
    assert st.changed_since_study_start(spec) == [f"config file {conf} changed", "default hidden_dropout_prob: 0.3 -> 0.5"]

    # the cell process refuses before training; the study marks the cell and says why
    status = st._run_cell(study, spec, log=lambda msg: None)
    assert status == "config changed"
    failed = json.load(open(spec["failed"]))
    assert "hidden_dropout_prob: 0.3 -> 0.5" in failed["error"] and "never mixes configurations" in failed["error"]
    assert not os.path.exists(spec["record"])
    row = next(r for r in st.collect_cells(study) if (r["model"], r["seed"]) == ("SASRec", 1))
    assert row["status"] == "config changed" and "hidden_dropout_prob" in row["error"]


def test_epochs_and_wall_time_columns():
    """The table says how long each model trained (and whether the epoch cap, not early stopping,
    ended it) and how long its cells took."""
    def cell(epochs, wall, cap=12, step1=None, step1_cap=None):
        row = {"epochs": epochs, "max_epochs": cap, "wall_time_s": wall}
        if step1_cap is not None:  # a two-step run: step1 None = reused, not trained
            row["stage"] = {"name": "step1", "epochs": step1, "max_epochs": step1_cap}
        return row

    assert st._epochs_text([cell(12, 366.4), cell(12, 378.2)]) == "12 (cap)"
    assert st._wall_text([cell(12, 366.4), cell(12, 378.2)]) == "366-378 s"
    assert st._epochs_text([cell(25, 1), cell(28, 1)]) == "25-28"
    assert st._epochs_text([cell(12, 1), cell(9, 1)]) == "9-12"  # one seed stopped early: no (cap)
    assert st._epochs_text([cell(12, 1, step1=12, step1_cap=12), cell(10, 1, step1=12, step1_cap=12)]) == "12 (cap) + 10-12"
    assert st._epochs_text([cell(7, 1, step1=None, step1_cap=12)]) == "reused + 7"
    assert st._epochs_text([]) == "—" and st._wall_text([cell(3, None)]) == "—"
    assert st._wall_text([cell(3, 41.6)]) == "42 s"


def test_collected_wall_time_sums_the_attempts_of_a_resumed_cell(env):
    """A cell interrupted and resumed from its checkpoint cost both attempts; a study killed before
    noting a finished attempt's end falls back on the run's own total; step-1 epochs come from
    the record's step-1 history."""
    study = validate_study(write(env / "tiny.yaml", TINY_STUDY))
    def put(model, seed, attempts, history, total=50.0):
        paths = study.cell_paths("tiny", model, seed)
        os.makedirs(os.path.dirname(paths["record"]), exist_ok=True)
        st._write_json(paths["cell"], {"attempts": attempts})
        st._write_json(paths["record"], {"status": "finished", "dataset": "tiny", "model": model, "seed": seed,
                                         "test_result": {"hit@10": 0.1}, "best_valid_result": {"hit@10": 0.2},
                                         "timings_s": {"total": total}, "config": {"epochs": 12},
                                         "history": history})
    put("SASRec", 1, [{"started": "a", "ended": "b", "wall_s": 559.4, "status": "interrupted"},
                      {"started": "c", "ended": "d", "wall_s": 200.1, "status": "finished"}],
        {"train_loss": [1.0] * 12})
    put("SASRec", 2, [{"started": "a"}], {"train_loss": [1.0] * 9}, total=77.0)  # killed before noting the end
    put("GRU4Rec", 1, [{"started": "a", "ended": "b", "wall_s": 30.0, "status": "finished"}],
        {"train_loss": [1.0] * 5, "step1": {"reused": False, "history": {"train_loss": [1.0] * 12}}})
    rows = {(r["model"], r["seed"]): r for r in st.collect_cells(study)}
    assert rows["SASRec", 1]["wall_time_s"] == pytest.approx(759.5) and rows["SASRec", 1]["attempts"] == 2
    assert rows["SASRec", 2]["wall_time_s"] == 77.0 and rows["SASRec", 2]["epochs"] == 9
    gru = rows["GRU4Rec", 1]
    # a record from before "stages" (SICSRec's step 1 in history.step1) is read as its first stage
    assert (gru["epochs"], gru["max_epochs"], gru["stage"]["epochs"], gru["stage"]["max_epochs"]) == (5, 12, 12, 12)
    assert st._epochs_text([gru]) == "12 (cap) + 5"
    assert st._epochs_text([rows["SASRec", 1], rows["SASRec", 2]]) == "9-12"


def test_cells_get_a_share_folder_only_when_checkpoints_are_kept(env):
    """SASRec cells publish their best checkpoint for the SICSRec cells (tests/test_sicsrec.py) into the
    study's share_dir, given through the cell (not the environment, not the cell's configuration); a
    study that deletes checkpoints gets no share folder, and variants never do."""
    keep = validate_study(write(env / "keep.yaml", TINY_STUDY.replace("keep_checkpoints: false", "keep_checkpoints: true")))
    spec = keep.cell_spec("tiny", "SASRec", 1)
    assert spec["share_dir"] == os.path.join(keep.output_dir, "saved") and "share_dir" not in spec["config_dict"]
    assert validate_study(write(env / "drop.yaml", TINY_STUDY)).cell_spec("tiny", "SASRec", 1)["share_dir"] is None


def test_step1_section_pairs_each_run_with_its_own_step1():
    """SICSRec records carry their step-1 SASRec's test metrics; the report pairs them per seed."""
    from types import SimpleNamespace

    from recbole_mm.study import _csv_text, stage_table as step1_table

    study = SimpleNamespace(models=["SASRec", "SICSRec", "TSSR"])
    def row(model, seed, ndcg, step1):
        return {"dataset": "D", "model": model, "seed": seed, "status": "finished", "test": {"ndcg@10": ndcg},
                "valid": {}, "stage": None if step1 is None else {"name": "step1", "label": "step-1 SASRec",
                                                                   "test": {"ndcg@10": step1}},
                "record": "r", "log": "l", "error": None}
    rows = [row("SASRec", 1, 0.10, None), row("SICSRec", 1, 0.12, 0.10), row("SICSRec", 2, 0.13, 0.115),
            row("SICSRec", 3, 0.11, 0.085)]
    text = step1_table(study, rows, "D", ["ndcg@10"])
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| SICSRec")}
    assert "0.1000 ± 0.0150" in lines["| SICSRec step-1 SASRec"]
    assert "0.1200 ± 0.0100" in lines["| SICSRec"]
    assert "+20.0% (p=" in lines["| SICSRec vs step-1 SASRec"] and "n=3" in lines["| SICSRec vs step-1 SASRec"]
    assert "| SASRec step-1" not in text  # models without step-1 results get no row
    # other models are paired with the step-1 SASRec of their seed (TSSR has seeds 1 and 3)
    rows += [row("TSSR", 1, 0.11, None), row("TSSR", 3, 0.0935, None)]
    text = step1_table(study, rows, "D", ["ndcg@10"])
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines["| TSSR"].startswith("| TSSR | 2 | 0.1018 ± 0.0117")
    assert "+10.0% (p=" in lines["| TSSR vs SICSRec step-1 SASRec (same seed)"] and "n=2" in lines["| TSSR vs SICSRec step-1 SASRec (same seed)"]
    assert lines["| SASRec"].startswith("| SASRec | 1 | 0.1000")
    # a SASRec cell equal to SICSRec's step 1 of its seed is the same run: said so, not "+0.0% (p=n/a)"
    assert lines["| SASRec vs SICSRec step-1 SASRec (same seed)"].startswith("| SASRec vs SICSRec step-1 SASRec (same seed) | | identical on every seed (n=1)")
    assert step1_table(study, rows[:1], "D", ["ndcg@10"]) == ""
    header, *body = _csv_text([dict(r, **{c: None for c in ("role", "wall_time_s")}) for r in rows]).splitlines()
    assert "step1_test_ndcg@10" in header.split(",") and body[1].split(",")[header.split(",").index("step1_test_ndcg@10")] == "0.1"
