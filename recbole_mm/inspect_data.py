"""``run_recbole_mm.py inspect``: look at a user's own RecBole atomic dataset, write a starter YAML.

    python run_recbole_mm.py inspect --dataset=NAME [--data_path=dataset/] [--write-config]

Reads ``<data_path>/<NAME>/<NAME>.inter`` (and ``.item`` / ``.user`` when present), checks them
with the same preflight a run uses (:func:`recbole_mm.data.preflight.check_atomic_files`) and
reports the columns and their types, the user/item/timestamp columns it guesses, users, items and
interactions, exact duplicate rows and consecutive repeats (what a run drops by default,
:func:`recbole_mm.data.checks.find_duplicates`), history lengths, and how many items have a value
in each ``.item`` column that can become item text.

``--write-config`` writes ``<data_path>/<NAME>/<NAME>.yaml`` (never over an existing file): the
id and time columns, ``load_col`` and an ``mm_features`` text spec whose template names the
``.item`` columns explicitly (numbers such as a year included: the default field list takes only
``token``/``token_seq`` columns). A run finds that file by itself (the dataset-config search
path, :func:`recbole_mm.config.dataset_config_candidates`). Only numpy/pandas are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

__all__ = ["inspect_dataset", "format_report", "starter_config", "write_starter_config", "main"]

USER_NAMES = ("user_id", "userid", "user", "uid", "customer_id", "customer", "reviewer_id", "reviewerid",
              "visitor_id", "member_id", "account_id", "session_id")
ITEM_NAMES = ("item_id", "itemid", "item", "iid", "product_id", "product", "sku", "asin", "movie_id",
              "video_id", "article_id", "song_id", "track_id", "book_id", "business_id", "news_id", "poi_id")
TIME_NAMES = ("timestamp", "time", "ts", "unix_time", "unixtime", "datetime", "date", "event_time",
              "created_at", "time_stamp", "position", "step")
TITLE_HINTS = ("title", "name", "headline", "caption")
SKIP_HINTS = ("url", "uri", "link", "image", "img", "pic", "photo", "path", "file", "thumbnail", "cover")
TEXT_TYPES = ("token", "token_seq", "float")
MIN_HISTORY = 3  # leave-one-out: one test item, one validation item, at least one to train on


def _is(name, names):
    return name.lower() in names


def _guess_fields(inter_header, item_header, user_field=None, item_field=None, time_field=None):
    """(user, item, time, notes): the guessed id and time columns of the .inter file."""
    notes = []
    tokens = [n for n, t in inter_header if t == "token"]
    floats = [n for n, t in inter_header if t == "float"]
    names = [n for n, _ in inter_header]
    uid = user_field or next((n for n in tokens if _is(n, USER_NAMES)), None)
    iid = item_field
    if iid is None:
        iid = next((n for n in tokens if _is(n, ITEM_NAMES) and n != uid), None)
    if iid is None and item_header:
        # the .item file's id column, when the .inter file has it too
        iid = next((n for n, t in item_header if t == "token" and n in tokens and n != uid), None)
    rest = [n for n in tokens if n not in (uid, iid)]
    if uid is None and rest:
        uid = rest.pop(0)
        notes.append(f"user column guessed as '{uid}' (the first token column); --user_field=NAME sets it")
    if iid is None and rest:
        iid = rest.pop(0)
        notes.append(f"item column guessed as '{iid}' (the next token column); --item_field=NAME sets it")
    ts = time_field
    if ts is None:
        ts = next((n for n in floats if _is(n, TIME_NAMES)), None)
        if ts is None:
            ts = next((n for n in floats if re.search(r"time|date|(^|_)ts$", n.lower())), None)
            if ts is not None:
                notes.append(f"timestamp column guessed as '{ts}'; --time_field=NAME sets it")
        wrong = [n for n, t in inter_header if _is(n, TIME_NAMES) and t != "float"]
        if ts is None and wrong:
            notes.append(f"column '{wrong[0]}' looks like a time but is not typed float: RecBole sorts by "
                         f"a float TIME_FIELD; write its header as '{wrong[0]}:float' (numbers, e.g. unix seconds)")
    for key, value in (("user", uid), ("item", iid), ("time", ts)):
        if value is not None and value not in names:
            raise ValueError(f"--{key}_field={value}: the .inter file has no such column (columns: {names})")
    return uid, iid, ts, notes


def _stats(values):
    import numpy as np

    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"min": 0, "median": 0.0, "mean": 0.0, "max": 0}
    return {"min": int(a.min()), "median": float(np.median(a)), "mean": round(float(a.mean()), 2),
            "max": int(a.max())}


def _coverage(item_df, item_types, id_col, missing_values):
    """{column: {type, coverage, non_empty}} for the .item columns that can become item text."""
    markers = set(missing_values)
    out = {}
    n = len(item_df)
    for col in item_df.columns:
        if col == id_col or item_types[col] not in TEXT_TYPES:
            continue
        vals = item_df[col].str.strip()
        ok = ~vals.str.lower().isin(markers)
        k = int(ok.sum())
        out[col] = {"type": item_types[col], "non_empty": k, "coverage": round(k / n, 4) if n else 0.0}
    return out


def inspect_dataset(dataset, data_path="dataset/", user_field=None, item_field=None, time_field=None):
    """Check and summarise ``<data_path>/<dataset>/<dataset>.inter`` (+ ``.item``, ``.user``).

    Returns a dict (see :func:`format_report`); raises
    :class:`~recbole_mm.data.preflight.DataFileError` for a file a run could not load.
    """
    from recbole_mm.data.checks import find_duplicates
    from recbole_mm.data.preflight import DataFileError, check_atomic_files, read_atomic_header
    from recbole_mm.features.item_file import _read_atomic_file
    from recbole_mm.features.text import normalize_missing_values

    data_path = os.fspath(data_path or "dataset/")
    folder = os.path.join(data_path, dataset)
    files = {s: os.path.join(folder, f"{dataset}.{s}") for s in ("inter", "item", "user")}
    headers = {s: read_atomic_header(p) for s, p in files.items() if os.path.isfile(p)}
    uid = iid = ts = None
    notes = []
    if "inter" in headers:
        uid, iid, ts, notes = _guess_fields(headers["inter"], headers.get("item"), user_field, item_field,
                                            time_field)
    # the same checks a run makes (folder, files, header, rows, float values, id columns)
    check_atomic_files({"dataset": dataset, "data_path": folder, "load_col": None,
                        "USER_ID_FIELD": uid or "user_id", "ITEM_ID_FIELD": iid or "item_id"})
    if not os.path.isfile(files["inter"]):  # a dataset RecBole downloads on its first run
        raise DataFileError(files["inter"], "the dataset is not there yet; RecBole downloads it on the first "
                            "run of a model", f"run e.g. `python run_recbole_mm.py --model=SASRec "
                            f"--dataset={dataset} --epochs=1` once, then inspect it")
    inter, inter_types = _read_atomic_file(files["inter"])
    report = {
        "dataset": dataset, "data_path": data_path, "folder": folder,
        "files": {s: {"path": files[s], "columns": [{"name": n, "type": t} for n, t in h]}
                  for s, h in headers.items()},
        "user_field": uid, "item_field": iid, "time_field": ts, "notes": notes, "warnings": [],
    }
    if ts is not None:
        import pandas as pd

        inter[ts] = pd.to_numeric(inter[ts].str.strip(), errors="coerce")  # '' -> NaN
        n_nan = int(inter[ts].isna().sum())
        if n_nan:
            report["warnings"].append(f"{n_nan} interactions have no {ts} value (NaN): RecBole fills them "
                                      "and their order in a user's sequence is not defined")
    exact, repeat = find_duplicates(inter, uid, iid, ts)
    lengths = inter.groupby(uid, sort=False).size()
    report["n_interactions"] = int(len(inter))
    report["n_users"] = int(inter[uid].nunique())
    report["n_items"] = int(inter[iid].nunique())
    report["exact_duplicates"] = int(exact.sum())
    report["consecutive_repeats"] = int(repeat.sum())
    report["history_length"] = _stats(lengths.to_numpy())
    report["users_below_min_history"] = int((lengths < MIN_HISTORY).sum())
    if ts is None:
        report["warnings"].append(
            "no timestamp column: RecBole's sequential models sort each user's interactions by "
            "TIME_FIELD (eval_args.order must be TO; order RO, random, is refused for sequential "
            "models). If the rows are in time order, add their position as a column, e.g. "
            f"python -c \"import pandas as pd; f='{files['inter']}'; d=pd.read_csv(f, sep='\\t', dtype=str, "
            "keep_default_na=False, quoting=3); d['timestamp:float']=range(len(d)); "
            "d.to_csv(f, sep='\\t', index=False, quoting=3)\" and run inspect again")
    if report["users_below_min_history"]:
        report["warnings"].append(
            f"{report['users_below_min_history']} users have fewer than {MIN_HISTORY} interactions: "
            "leave-one-out takes the last one for test and the one before for validation")

    item = None
    if "item" in headers:
        missing_values = normalize_missing_values(None)
        item_df, item_types = _read_atomic_file(files["item"])
        id_col = iid if iid in item_df.columns else None
        if id_col is None:
            report["warnings"].append(f"the .item file has no '{iid}' column: its rows cannot be matched "
                                      "to the interactions (no item text)")
        else:
            known = set(item_df[id_col])
            used = set(inter[iid])
            item = {
                "n_rows": int(len(item_df)), "id_field": id_col,
                "interacted_without_row": len(used - known), "rows_without_interaction": len(known - used),
                "text_columns": _coverage(item_df, item_types, id_col, missing_values),
                "other_columns": [c for c in item_df.columns if c != id_col and item_types[c] not in TEXT_TYPES],
            }
            if item["interacted_without_row"]:
                report["warnings"].append(f"{item['interacted_without_row']} of {len(used)} interacted items "
                                          "have no .item row (no text: a zero feature, flagged missing)")
    report["item"] = item
    report["dataset_config_in_use"] = _config_in_use(dataset, data_path)
    return report


def _config_in_use(dataset, data_path):
    from recbole_mm.config import dataset_config_candidates

    return next((os.path.abspath(p) for p in dataset_config_candidates(dataset, data_path)
                 if os.path.isfile(p)), None)


# ------------------------------------------------------------------------------------ text spec

def _text_plan(report):
    """(fields, template, skipped {column: why}) for the starter mm_features text spec."""
    item = report.get("item")
    if not item:
        return [], None, {}
    cols = item["text_columns"]
    skipped = {}
    usable = []
    for name, info in cols.items():
        low = name.lower()
        if info["non_empty"] == 0:
            skipped[name] = "no item has a value"
        elif any(h in low for h in SKIP_HINTS):
            skipped[name] = "looks like a link or file path"
        elif low.endswith("_id") or low == "id":
            skipped[name] = "looks like an id"
        else:
            usable.append(name)
    titles = [c for c in usable if any(h in c.lower() for h in TITLE_HINTS)]
    years = [c for c in usable if cols[c]["type"] == "float" and re.search(r"year|date", c.lower())]
    others = [c for c in usable if c not in titles and c not in years]
    fields = titles + years + others
    if not fields:
        return [], None, skipped
    if any(re.search(r"[{}\[\].:!]", c) for c in fields):
        return fields, None, skipped  # not nameable in a format string: fields joined with '. '
    parts = []
    if titles:
        head = ". ".join("{%s}" % c for c in titles)
        if years:
            head += " (" + ", ".join("{%s}" % c for c in years) + ")"
        parts.append(head)
    else:
        others = years + others
    for c in others:
        label = c.replace("_", " ")
        parts.append(f"{label[:1].upper() + label[1:]}: {{{c}}}")
    return fields, ". ".join(parts), skipped


# ------------------------------------------------------------------------------------ YAML

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "nan", "inf"}


def _y(value):
    """``value`` as a YAML scalar or flow list (plain when safe, else a JSON string)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_y(v) for v in value) + "]"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text, ensure_ascii=False)


def _lines_with_comments(rows):
    width = max(len(code) for code, _ in rows if code) + 2
    out = []
    for code, comment in rows:
        if not code:
            out.append(f"# {comment}" if comment else "")
        elif comment:
            out.append(f"{code.ljust(width)}# {comment}")
        else:
            out.append(code)
    return "\n".join(out) + "\n"


def starter_config(report):
    """The text of a starter dataset YAML for ``report`` (every line commented)."""
    name, uid, iid, ts = report["dataset"], report["user_field"], report["item_field"], report["time_field"]
    rows = [
        ("", f"Dataset config for '{name}', written by `run_recbole_mm.py inspect --write-config`; edit freely."),
        ("", "Found by every run: ./properties/dataset/<name>.yaml, then <data_path>/<name>/<name>.yaml (this"),
        ("", "file), then the packaged one; --config_files and --key=value override it."),
        (f"USER_ID_FIELD: {_y(uid)}", "user column of the .inter file"),
        (f"ITEM_ID_FIELD: {_y(iid)}", "item column of the .inter (and .item) file"),
    ]
    if ts is not None:
        rows.append((f"TIME_FIELD: {_y(ts)}", "orders each user's interactions (leave-one-out by time)"))
    else:
        rows.append(("", "TIME_FIELD: no timestamp column. Sequential models need one (eval_args.order: TO sorts"))
        rows.append(("", "by it; RO, a random order, is refused): add one (see the inspect report) and set it here."))
    load = [c for c in (uid, iid, ts) if c is not None]
    rows += [
        ("load_col:", "columns RecBole loads (item text is read from the .item file by the feature store)"),
        (f"  inter: {_y(load)}", "the .inter columns a sequential model needs"),
    ]
    fields, template, skipped = _text_plan(report)
    if fields:
        item = report["item"]
        cov = ", ".join(f"{c} {100 * item['text_columns'][c]['coverage']:.0f}%" for c in fields)
        rows += [
            ("mm_features:", "item content for the multimodal models (TSSR, SICSRec, ...)"),
            ("  text:", "feature name (TSSR's text_feature)"),
            ("    type: text", "text of the .item columns, encoded by a text encoder"),
            (f"    fields: {_y(fields)}", f".item columns used; items with a value: {cov}"),
        ]
        if template is not None:
            rows.append((f"    template: {_y(template)}", "one item's text; a missing value renders empty"))
        else:
            rows.append(("", "    (no template: a column name cannot appear in one; the values are joined with '. ')"))
        rows += [
            (f"    id_field: {_y(item['id_field'])}", "item column of the .item file"),
            ("    encoder: default", "offline all-MiniLM-L6-v2; or a hub name / local path"),
            ("    pooling: mean", "mean | cls | pooler"),
        ]
        if skipped:
            rows.append(("", "not used: " + "; ".join(f"{c} ({why})" for c, why in skipped.items())))
    else:
        why = "no .item file" if not report.get("item") else "the .item file has no text column"
        rows.append(("", f"mm_features: none written ({why}); models that read item text need one, e.g."))
        rows.append(("", "mm_features: {text: {type: text, fields: [title], template: '{title}'}}"))
    return _lines_with_comments(rows)


def write_starter_config(report, path=None):
    """Write :func:`starter_config` to ``path`` (default ``<data_path>/<name>/<name>.yaml``); an existing
    file is never overwritten (:class:`FileExistsError`). Returns the path."""
    path = path or os.path.join(report["folder"], f"{report['dataset']}.yaml")
    text = starter_config(report)
    try:
        with open(path, "x", encoding="utf-8") as f:  # "x": never replaces a file, even one made meanwhile
            f.write(text)
    except FileExistsError:
        raise FileExistsError(f"{path} exists and is not overwritten; edit it, or delete it and run "
                              "inspect --write-config again") from None
    return path


# ------------------------------------------------------------------------------------ report

def format_report(report):
    r = report
    out = [f"dataset '{r['dataset']}' in {r['folder']}"]
    for source, info in r["files"].items():
        cols = ", ".join(f"{c['name']}:{c['type']}" for c in info["columns"])
        out.append(f"  {os.path.basename(info['path'])}: {cols}")
    out.append(f"user column: {r['user_field']}   item column: {r['item_field']}   "
               f"timestamp column: {r['time_field'] or 'none'}")
    out += [f"  note: {n}" for n in r["notes"]]
    out.append(f"interactions: {r['n_interactions']}   users: {r['n_users']}   items: {r['n_items']}")
    h = r["history_length"]
    out.append(f"history length per user: min {h['min']}, median {h['median']:g}, mean {h['mean']:g}, "
               f"max {h['max']}; users with fewer than {MIN_HISTORY}: {r['users_below_min_history']}")
    out.append(f"exact duplicate rows: {r['exact_duplicates']}   consecutive repeats: {r['consecutive_repeats']}"
               + ("   (a run drops them: duplicate_interactions / consecutive_repeats: drop | error | keep)"
                  if r["exact_duplicates"] or r["consecutive_repeats"] else ""))
    item = r.get("item")
    if item:
        out.append(f".item: {item['n_rows']} rows; interacted items without a row: {item['interacted_without_row']}; "
                   f"rows without interactions: {item['rows_without_interaction']}")
        if item["text_columns"]:
            out.append("text coverage (items with a value; NaN/None/null/N/A/empty count as missing):")
            for c, info in item["text_columns"].items():
                out.append(f"  {c} ({info['type']}): {100 * info['coverage']:.1f}% ({info['non_empty']}/{item['n_rows']})")
        if item["other_columns"]:
            out.append(f"  not text: {', '.join(item['other_columns'])}")
    elif "item" not in r["files"]:
        out.append(".item: none (models that read item text need one)")
    out += [f"WARNING: {w}" for w in r["warnings"]]
    used = r.get("dataset_config_in_use")
    out.append(f"dataset config a run reads now: {used or 'none'}")
    return "\n".join(out)


def build_parser():
    p = argparse.ArgumentParser(
        prog="run_recbole_mm.py inspect", allow_abbrev=False,
        description="Check and summarise a RecBole atomic dataset <data_path>/<NAME>/<NAME>.inter "
                    "(+ .item, .user); --write-config writes a starter <NAME>.yaml next to it.")
    p.add_argument("--dataset", "-d", required=True, help="dataset name (the folder and file prefix)")
    p.add_argument("--data_path", "--data-path", default="dataset/",
                   help="folder holding the dataset's folder (default: dataset/)")
    p.add_argument("--write-config", "--write_config", action="store_true",
                   help="write <data_path>/<NAME>/<NAME>.yaml (never overwrites an existing file)")
    p.add_argument("--user_field", default=None, help="user column (default: guessed)")
    p.add_argument("--item_field", default=None, help="item column (default: guessed)")
    p.add_argument("--time_field", default=None, help="timestamp column (default: guessed)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from recbole_mm.data.preflight import DataFileError

    try:
        report = inspect_dataset(args.dataset, args.data_path, args.user_field, args.item_field, args.time_field)
    except (DataFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if not args.write_config:
        if not report["dataset_config_in_use"]:
            print("next: add --write-config to write a starter dataset config")
        return 0
    try:
        path = write_starter_config(report)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    used = _config_in_use(args.dataset, args.data_path)
    if used and os.path.abspath(used) != os.path.abspath(path):
        print(f"WARNING: {used} is found first and is the one a run reads; move or delete it to use {path}")
    print(f"next: python run_recbole_mm.py --model=TSSR --dataset={args.dataset} --data_path={args.data_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
