"""A user's own atomic dataset: ``inspect --write-config``, then a run, with no hand-written YAML
(issue 16); the dataset-config search path."""

import json
import os
import sys

import pytest
import yaml

from recbole_mm.__main__ import main

WORDS = "red blue green small large fast slow bright dark soft".split()


def write_own_dataset(root, name="mine", n_users=24, n_items=30, with_time=True):
    """Atomic files with other column names than ml-100k: uid/sku/ts, and name/year/genre items."""
    folder = os.path.join(str(root), name)
    os.makedirs(folder, exist_ok=True)
    inter = ["uid:token\tsku:token" + ("\tts:float" if with_time else "")]
    for u in range(1, n_users + 1):
        start = (7 * u) % n_items
        for k in range(4 + u % 5):
            inter.append(f"c{u}\tp{(start + k) % n_items + 1}" + (f"\t{1000 * u + k}" if with_time else ""))
    inter.append(inter[3])  # one exact duplicate row
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(inter) + "\n")
    item = ["sku:token\tname:token_seq\tyear:float\tgenre:token_seq\tcover_url:token"]
    for i in range(1, n_items + 1):
        title = "N/A" if i == 3 else f"thing {i} {WORDS[i % len(WORDS)]}"
        year = "" if i == 4 else str(1980 + i)
        item.append(f"p{i}\t{title}\t{year}\tgenre{i % 3}\thttp://img/{i}.jpg")
    with open(os.path.join(folder, f"{name}.item"), "w") as f:
        f.write("\n".join(item) + "\n")
    return folder


def test_inspect_write_config_then_tssr_run(workdir, capsys):
    folder = write_own_dataset(workdir / "dataset")  # data_path's default, as in the README

    # the README's two commands (the run with tiny sizes)
    assert main(["inspect", "--dataset=mine", "--write-config"]) == 0
    out = capsys.readouterr().out
    assert "mine.inter: uid:token, sku:token, ts:float" in out
    assert "user column: uid   item column: sku   timestamp column: ts" in out
    assert "interactions: 147   users: 24   items: 30" in out
    assert "exact duplicate rows: 1" in out and "consecutive repeats: 0" in out
    assert "name (token_seq): 96.7% (29/30)" in out          # 'N/A' counts as missing
    assert "year (float): 96.7% (29/30)" in out              # an empty float counts as missing
    assert "history length per user: min 4," in out

    path = os.path.join(folder, "mine.yaml")
    text = open(path).read()
    assert all("#" in line for line in text.splitlines() if line.strip())  # every line commented
    cfg = yaml.safe_load(text)
    assert cfg["USER_ID_FIELD"] == "uid" and cfg["ITEM_ID_FIELD"] == "sku" and cfg["TIME_FIELD"] == "ts"
    assert cfg["load_col"] == {"inter": ["uid", "sku", "ts"]}
    spec = cfg["mm_features"]["text"]
    assert spec["fields"] == ["name", "year", "genre"]       # title first; the float year listed
    assert spec["template"] == "{name} ({year}). Genre: {genre}"
    assert spec["id_field"] == "sku" and "cover_url" in text  # the link column: named as not used

    from recbole_mm.data.extract import read_item_texts

    tokens, texts = read_item_texts(os.path.join(folder, "mine.item"), spec["fields"], spec["template"],
                                    spec["id_field"])
    assert texts[0] == "thing 1 blue (1981). Genre: genre1"

    # never overwritten
    assert main(["inspect", "--dataset=mine", "--write-config"]) == 1
    assert "exists and is not overwritten" in capsys.readouterr().err
    assert open(path).read() == text

    rc = main(["--model=TSSR", "--dataset=mine", "--epochs=1", "--hidden_size=16", "--inner_size=32",
               "--n_heads=1", "--MAX_ITEM_LIST_LENGTH=10", "--train_batch_size=64", "--eval_batch_size=64",
               "--show_progress=False", "--state=ERROR", f"--checkpoint_dir={workdir / 'saved'}"])
    out = capsys.readouterr().out
    assert rc == 0 and "test result:" in out
    manifest = json.load(open(os.path.join(folder, "mine.text.json")))
    assert manifest["template"] == spec["template"]
    record = json.load(open(out.split("record: ", 1)[1].split()[0]))
    assert record["dataset_config_file"] == os.path.abspath(path)
    assert record["data_checks"]["exact_duplicates"] == 1


def test_inspect_without_timestamp_or_item_file(workdir, capsys):
    folder = write_own_dataset(workdir / "data", "notime", with_time=False)
    os.remove(os.path.join(folder, "notime.item"))
    assert main(["inspect", "--dataset=notime", f"--data_path={workdir / 'data'}", "--write-config"]) == 0
    out = capsys.readouterr().out
    assert "timestamp column: none" in out and "WARNING: no timestamp column" in out
    assert "eval_args.order must be TO" in out
    cfg = yaml.safe_load(open(os.path.join(folder, "notime.yaml")))
    assert "TIME_FIELD" not in cfg and cfg["load_col"] == {"inter": ["uid", "sku"]}
    assert "mm_features" not in cfg


def test_inspect_reports_bad_files_in_one_line(workdir, capsys):
    assert main(["inspect", "--dataset=nothere", f"--data_path={workdir / 'data'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    folder = write_own_dataset(workdir / "data", "bad")
    with open(os.path.join(folder, "bad.inter"), "a") as f:
        f.write("c1\tp1\tsoon\n")
    assert main(["inspect", "--dataset=bad", f"--data_path={workdir / 'data'}", "--write-config"]) == 1
    err = capsys.readouterr().err
    assert "'soon' is not a number" in err and "column 'ts'" in err
    assert not os.path.exists(os.path.join(folder, "bad.yaml"))


def test_dataset_config_search_order(workdir):
    from recbole_mm.config import MMConfig, properties_dir

    write_own_dataset(workdir / "data")
    overrides = {"data_path": str(workdir / "data")}
    next_to_data = workdir / "data" / "mine" / "mine.yaml"
    next_to_data.write_text("USER_ID_FIELD: uid\nITEM_ID_FIELD: sku\nTIME_FIELD: ts\nMAX_ITEM_LIST_LENGTH: 7\n")
    config = MMConfig("SASRec", "mine", config_dict=overrides)
    assert config.dataset_config_file == str(next_to_data) and config["MAX_ITEM_LIST_LENGTH"] == 7
    assert "dataset config: " + str(next_to_data) in str(config)

    local = workdir / "properties" / "dataset" / "mine.yaml"  # ./properties/dataset/ comes first
    local.parent.mkdir(parents=True)
    local.write_text("USER_ID_FIELD: uid\nITEM_ID_FIELD: sku\nTIME_FIELD: ts\nMAX_ITEM_LIST_LENGTH: 5\n")
    config = MMConfig("SASRec", "mine", config_dict=overrides)
    assert config.dataset_config_file == str(local) and config["MAX_ITEM_LIST_LENGTH"] == 5

    user = workdir / "user.yaml"  # user config files and overrides still beat it
    user.write_text("MAX_ITEM_LIST_LENGTH: 9\n")
    assert MMConfig("SASRec", "mine", config_file_list=[str(user)], config_dict=overrides)["MAX_ITEM_LIST_LENGTH"] == 9
    assert MMConfig("SASRec", "mine", config_dict=dict(overrides, MAX_ITEM_LIST_LENGTH=3))["MAX_ITEM_LIST_LENGTH"] == 3

    # packaged datasets unchanged
    config = MMConfig("SASRec", "ml-100k", config_dict=overrides)
    assert config.dataset_config_file == os.path.join(properties_dir(), "dataset", "ml-100k.yaml")
    assert config["mm_features"]["text"]["template"] == "{movie_title} ({release_year}). Genres: {class}"
    bili = MMConfig("SASRec", "Bili_Food", config_dict=overrides)
    assert bili["valid_metric"] == "Hit@10" and bili.dataset_config_file.startswith(properties_dir())


def test_inspect_is_light():
    """`inspect` does not import torch."""
    import subprocess

    code = ("import sys; from recbole_mm.__main__ import main; "
            "rc = main(['inspect', '--dataset=x', '--data_path=/nonexistent']); "
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.stdout.strip() == "1 False", proc.stdout + proc.stderr


def test_unknown_key_in_own_dataset_yaml_is_reported(workdir):
    from recbole_mm.config import MMConfig
    from recbole_mm.validate import ConfigError

    write_own_dataset(workdir / "dataset")
    (workdir / "dataset" / "mine" / "mine.yaml").write_text("USER_ID_FEILD: uid\nITEM_ID_FIELD: sku\n")
    with pytest.raises(ConfigError, match="mine.yaml: unknown config key 'USER_ID_FEILD'.*USER_ID_FIELD"):
        MMConfig("SASRec", "mine")
