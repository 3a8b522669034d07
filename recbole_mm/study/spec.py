"""The study spec: the line-tracking YAML loader, the study's keys and their validation (:class:`Study`,
:func:`validate_study`), dataset sources, each cell's spec and paths, run records, and the checks that a
finished cell's configuration has not drifted (``LOCATION_KEYS``, ``BEHAVIOUR_KEEPING_DEFAULTS``)."""

import contextlib
import hashlib
import json
import os
import re
import sys

import yaml

from recbole_mm.atomic import write_text_atomic
from recbole_mm.validate import known_keys, suggest, value_problems


# Plugin models that are baselines (RecBole models are always baselines).

STUDY_KEYS = {
    "name": "study name (default: the YAML file name)",
    "description": "free text, copied into results.md",
    "output_dir": "study folder (default: studies/<name>, relative to the working directory)",
    "datasets": "list of dataset names",
    "models": "list of model names (plugin or RecBole) or variants {name, model, config, role}",
    "seeds": "list of integer seeds (default: [2020])",
    "sparsity": "list of fractions of the training data kept (sparsity_keep), a cell axis like seeds, e.g. "
                "[1.0, 0.5, 0.25] (default: none; every cell trains on all of it)",
    "metrics": "RecBole metrics for every cell, e.g. [Hit, NDCG]",
    "topk": "RecBole cut-offs for every cell, e.g. [5, 10]",
    "report": "metrics shown in the tables, e.g. [hit@10, ndcg@10] (default: metrics x topk)",
    "proposed": "models compared against the best baseline (default: the models whose spec says role: proposed)",
    "config": "config overrides for every cell",
    "config_files": "RecBole YAML files for every cell",
    "dataset_config": "per-dataset overrides: {dataset: {key: value}}",
    "model_config": "per-model overrides: {model: {key: value}}",
    "sources": "how to build datasets that are not there: {dataset: {type: ninerec, path: ...}}",
    "keep_checkpoints": "keep each cell's best checkpoint (default: true)",
    "cell_timeout_s": "kill a cell after this many seconds (default: none)",
    "strict_keys": "unknown config keys are errors (default: true); false: warnings",
    "p_adjust": "multiple-comparison correction of the report's p-values: holm (default), bh or none",
}
# p_adjust values (study key): the multiple-comparison correction of a report's p-values
P_ADJUST_METHODS = {"holm": "Holm's step-down method, family-wise error rate",
                    "bh": "Benjamini-Hochberg, false discovery rate",
                    "none": "raw p-values only"}
# Keys the study sets for every cell itself.
RESERVED_CONFIG_KEYS = {
    "model": "list models under 'models:'",
    "dataset": "list datasets under 'datasets:'",
    "seed": "list seeds under 'seeds:'",
    "record_path": "the study sets each cell's record path",
    "record_runs": "a study needs the run records",
}
# Config keys RecBole reads without having defaults for them.
EXTRA_CONFIG_KEYS = {"mm_feature_names", "nproc", "world_size", "offset", "ip", "port"}
VARIANT_KEYS = {
    "name": "the variant's label: cell folders, tables, CSV, plots",
    "model": "the model class it runs (plugin or RecBole)",
    "config": "config overrides of the variant, over the study's config and model_config",
    "role": "baseline or proposed (default: the role of its model)",
}
SOURCE_TYPES = {
    "ninerec": {"required": (), "optional": ("path", "benchmark", "max_history")},
    "movielens": {"required": ("path",), "optional": ()},
    "amazon": {"required": ("reviews", "meta"), "optional": ("kcore", "image_dir")},
}
NINEREC_ENV = "RECBOLE_MM_NINEREC_DIR"


class StudyError(ValueError):
    """An invalid study (message names the YAML line) or a study that cannot run."""


# ============================================================================ YAML with lines


class _LineDict(dict):
    """A mapping that remembers the line of each key (``key_lines``) and its own ``line``."""

    line = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_lines = {}


class _LineList(list):
    """A sequence that remembers the line of each item (``item_lines``)."""

    line = None

    def __init__(self, *args):
        super().__init__(*args)
        self.item_lines = []


class _LineLoader(yaml.SafeLoader):
    """SafeLoader recording ``node.start_mark.line + 1`` for mapping keys and list items,
    refusing duplicate keys, and reading ``1e-4`` as a float (as RecBole's loader does)."""


def _construct_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark) from None
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {out.key_lines[key]})",
                key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader, node, deep=False):
    out = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _plain(obj):
    """Plain dicts and lists (the line-tracking containers stripped)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _parse_value(text):
    """A command-line value as YAML (``1`` -> 1, ``[5,10]`` -> list, ``1e-4`` -> float)."""
    try:
        return _plain(yaml.load(text, Loader=_LineLoader))
    except yaml.YAMLError:
        return text


def load_study(path):
    """Read a study YAML keeping line numbers; returns the mapping (a dict subclass)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_LineLoader)
    except FileNotFoundError:
        raise StudyError(f"{path}: study file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise StudyError(f"{path}{line}: YAML error: {problem}") from None
    if data is None:
        raise StudyError(f"{path}:1: the study file is empty")
    if not isinstance(data, dict):
        raise StudyError(f"{path}:1: a study must be a mapping (datasets:, models:, seeds:, ...)")
    return data


# ============================================================================ validation


class _Errors:
    def __init__(self, source):
        self.source = source
        self.items = []
        self.warnings = []

    def _where(self, line, path):
        loc = self.source + (f":{line}" if line else "")
        return f"{loc}: {path}: " if path else f"{loc}: "

    def add(self, line, path, message):
        self.items.append((line or 0, len(self.items), self._where(line, path) + message))

    def warn(self, line, path, message):
        self.warnings.append(self._where(line, path) + message)

    def raise_if_any(self):
        if self.items:
            head = f"invalid study ({len(self.items)} problem{'s' if len(self.items) > 1 else ''}):"
            raise StudyError("\n".join([head] + [f"  {m}" for _, _, m in sorted(self.items)]))


def _key_line(mapping, key):
    return getattr(mapping, "key_lines", {}).get(key) or getattr(mapping, "line", None)


def _item_line(seq, index):
    lines = getattr(seq, "item_lines", [])
    return lines[index] if index < len(lines) else getattr(seq, "line", None)


_suggest = suggest  # the validator's "did you mean", shared with single runs and tune


@contextlib.contextmanager
def _config_env():
    """Build RecBole configs in this process without its side effects leaking: a clean
    ``sys.argv`` (RecBole reads --key=value from it) and ``CUDA_VISIBLE_DEVICES`` restored."""
    argv = sys.argv
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    sys.argv = [argv[0] if argv else "recbole_mm"]
    try:
        yield
    finally:
        sys.argv = argv
        if cuda is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda


def _repo_root():
    # recbole_mm/study/spec.py: three levels up is the repository root
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_ninerec_path(dataset):
    """Where a NineRec dataset is looked for when its source names no path:
    ``$RECBOLE_MM_NINEREC_DIR/<name>``, else ``<repo>/../shared/data/ninerec_bili/<name>``
    (then the same relative to the working directory)."""
    env = os.environ.get(NINEREC_ENV)
    if env:
        return os.path.abspath(os.path.join(env, dataset))
    candidates = [
        os.path.join(_repo_root(), "..", "shared", "data", "ninerec_bili", dataset),
        os.path.join(os.getcwd(), "..", "shared", "data", "ninerec_bili", dataset),
    ]
    for cand in candidates:
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    return os.path.abspath(candidates[0])


def default_source(dataset):
    """The source of a dataset without a ``sources:`` entry: NineRec for ``Bili_*`` names, else None."""
    if not dataset.startswith("Bili_"):
        return None
    return {"type": "ninerec", "path": default_ninerec_path(dataset)}


def _dataset_present(data_dir, dataset, benchmark):
    if benchmark:
        return all(os.path.isfile(os.path.join(data_dir, f"{dataset}.{part}.inter")) for part in benchmark)
    return os.path.isfile(os.path.join(data_dir, f"{dataset}.inter"))


def _bad_name(v):
    """Not a usable name for a dataset, model or variant (they name folders)."""
    return not isinstance(v, str) or not v or "/" in v or "\\" in v or v in (".", "..")


def _model_role(model, proposed):
    return "proposed" if model in proposed else "baseline"


class Study:
    """A validated study: its cells, paths and per-cell configuration."""

    def __init__(self, spec, source="<dict>", output_dir=None, overrides=None):
        self.raw = spec
        self.source = source
        self.overrides = dict(overrides or {})
        self.errors = _Errors(source)
        self.defaults = {}  # (dataset, model) -> default config values, snapshotted at validation
        self._validate(output_dir)

    # ------------------------------------------------------------------ validation
    def _validate(self, output_dir):
        from recbole_mm.registry import get_model

        raw, err = self.raw, self.errors
        if not isinstance(raw, dict):
            raise StudyError(f"{self.source}: a study must be a mapping")
        for key in raw:
            if key not in STUDY_KEYS:
                err.add(_key_line(raw, key), "", f"unknown key {key!r}{_suggest(key, STUDY_KEYS)}; "
                        f"known keys: {', '.join(STUDY_KEYS)}")

        name = raw.get("name")
        if name is None:
            name = os.path.splitext(os.path.basename(self.source))[0] if self.source != "<dict>" else "study"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            err.add(_key_line(raw, "name"), "name", f"must be a simple name (letters, digits, _.-), got {name!r}")
            name = "study"
        self.name = name
        self.description = raw.get("description") or ""
        out = output_dir or raw.get("output_dir") or os.path.join("studies", name)
        if not isinstance(out, str):
            err.add(_key_line(raw, "output_dir"), "output_dir", f"must be a path, got {out!r}")
            out = os.path.join("studies", name)
        self.output_dir = os.path.abspath(out)

        self.datasets = self._name_list("datasets", required=True)
        models = self._name_list("models", required=True, variants=True)
        # self.models: the cells' labels (a model's name, or a variant's); self.variants: label -> variant
        self.models, self.variants, model_lines, aliases = [], {}, {}, {}

        def model_class(model, line, path):  # the model's class name, or None (error added)
            try:
                aliases[model] = get_model(model).__name__
            except Exception as exc:  # noqa: BLE001 - UnknownModelError or a model that fails to import
                err.add(line, path, str(exc) if "nknown model" in str(exc)
                        else f"model {model!r} cannot be loaded: {type(exc).__name__}: {exc}")
            return aliases.get(model)

        for i, entry in enumerate(models):
            line = _item_line(raw.get("models"), i)
            variant = self._variant(entry, f"models[{i}]", line) if isinstance(entry, dict) else None
            if isinstance(entry, dict) and variant is None:
                continue
            if variant is None:
                label = model_class(entry, line, f"models[{i}]")
            else:
                variant["model"] = model_class(variant["model"], _key_line(entry, "model"), f"models[{i}].model")
                label = variant["name"] if variant["model"] else None
            if label is None:
                continue
            if label in self.models:
                err.add(line, f"models[{i}]", f"model {label!r} is listed twice")
                continue
            self.models.append(label)
            model_lines[label] = line
            if variant is not None:
                self.variants[label] = variant
        self._model_lines = model_lines
        aliases.update({m: m for m in self.models})

        seeds = raw.get("seeds", [2020])
        if not isinstance(seeds, list) or not seeds:
            err.add(_key_line(raw, "seeds"), "seeds", f"must be a non-empty list of integers, got {seeds!r}")
            seeds = []
        self.seeds = []
        for i, seed in enumerate(seeds):
            if isinstance(seed, bool) or not isinstance(seed, int):
                err.add(_item_line(seeds, i), f"seeds[{i}]", f"a seed must be an integer, got {seed!r}")
            elif seed in self.seeds:
                err.add(_item_line(seeds, i), f"seeds[{i}]", f"seed {seed} is listed twice")
            else:
                self.seeds.append(seed)
        self.sparsity = self._sparsity_levels()

        # proposed models (the rest are baselines); a variant has its model's role unless it gives one
        proposed = raw.get("proposed")
        roles = {m: v["role"] for m, v in self.variants.items() if v["role"]}
        listed = []
        if proposed is None:
            from recbole_mm.registry import proposed_models

            own = set(proposed_models())  # the models whose spec says role: proposed
            listed = [m for m in self.models + self.base_models() if m in own]
        elif not isinstance(proposed, list):
            err.add(_key_line(raw, "proposed"), "proposed", "must be a list of model names")
        else:
            for i, m in enumerate(proposed):
                canonical = aliases.get(m, m)
                if canonical not in self.models:
                    err.add(_item_line(proposed, i), f"proposed[{i}]",
                            f"{m!r} is not one of the study's models {self.models}")
                elif roles.get(canonical) == "baseline":
                    err.add(_item_line(proposed, i), f"proposed[{i}]", f"{m!r} is a variant with role: baseline")
                else:
                    listed.append(canonical)
        self.proposed = [m for m in listed if m in self.models] + [
            m for m in self.models if m not in listed and roles.get(m, "proposed" if self.model_of(m) in listed
                                                                    else "baseline") == "proposed"]

        # metrics
        self.metrics = raw.get("metrics")
        self.topk = raw.get("topk")
        self._validate_metrics()

        # overrides
        self.config = self._mapping("config")
        self.dataset_config = self._nested("dataset_config", self.datasets, {})
        self.model_config = self._nested("model_config", self.models + self.base_models(), aliases)
        self.config_files = []
        files = raw.get("config_files") or []
        if isinstance(files, str):
            files = files.split()
        if not isinstance(files, list):
            err.add(_key_line(raw, "config_files"), "config_files", "must be a list of YAML files")
            files = []
        for i, f in enumerate(files):
            path = os.path.abspath(str(f))
            if not os.path.isfile(path):
                err.add(_item_line(raw.get("config_files"), i), f"config_files[{i}]", f"file not found: {path}")
            self.config_files.append(path)
        for key in ("keep_checkpoints", "strict_keys"):
            if key in raw and not isinstance(raw[key], bool):
                err.add(_key_line(raw, key), key, f"must be true or false, got {raw[key]!r}")
        self.keep_checkpoints = raw.get("keep_checkpoints", True) is not False
        self.strict_keys = raw.get("strict_keys", True) is not False
        timeout = raw.get("cell_timeout_s")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            err.add(_key_line(raw, "cell_timeout_s"), "cell_timeout_s", f"must be a positive number, got {timeout!r}")
            timeout = None
        self.cell_timeout_s = timeout
        p_adjust = raw.get("p_adjust", "holm")
        if not isinstance(p_adjust, str) or p_adjust.lower() not in P_ADJUST_METHODS:
            err.add(_key_line(raw, "p_adjust"), "p_adjust", f"must be one of {', '.join(P_ADJUST_METHODS)} ("
                    + "; ".join(f"{k}: {v}" for k, v in P_ADJUST_METHODS.items())
                    + f"), got {p_adjust!r}{_suggest(str(p_adjust).lower(), P_ADJUST_METHODS)}")
            p_adjust = "holm"
        self.p_adjust = p_adjust.lower()
        self.sources = self._validate_sources()

        for path, mapping in self._override_maps():
            for key in mapping:
                if key in RESERVED_CONFIG_KEYS:
                    err.add(_key_line(mapping, key), f"{path}.{key}",
                            f"{key!r} cannot be overridden: {RESERVED_CONFIG_KEYS[key]}")
        for key in self.overrides:
            if key in RESERVED_CONFIG_KEYS:
                err.add(None, f"command line --{key}", f"cannot be overridden: {RESERVED_CONFIG_KEYS[key]}")
        if self.sparsity is not None:  # the axis sets sparsity_keep per cell
            for path, mapping in self._override_maps():
                if "sparsity_keep" in mapping:
                    err.add(_key_line(mapping, "sparsity_keep"), f"{path}.sparsity_keep",
                            "'sparsity_keep' is set per cell by the study's `sparsity:` list")
            if "sparsity_keep" in self.overrides:
                err.add(None, "command line --sparsity_keep", "set per cell by the study's `sparsity:` list")
        if self.metrics is not None and "metrics" in self.config:
            err.add(_key_line(self.config, "metrics"), "config.metrics", "metrics are given twice (top level and config)")
        if self.topk is not None and "topk" in self.config:
            err.add(_key_line(self.config, "topk"), "config.topk", "topk is given twice (top level and config)")

        # datasets and config keys need RecBole configs of valid models: checked whenever there are
        # some, so that one pass reports every problem it can
        if self.models and self.datasets:
            self._validate_config_keys_and_datasets()
        err.raise_if_any()
        if self.sparsity is None:
            self.cells = [(d, m, s) for d in self.datasets for m in self.models for s in self.seeds]
        else:  # (dataset, model, seed, level): a dataset's levels in the order given, all models at each
            self.cells = [(d, m, s, k) for d in self.datasets for k in self.sparsity for m in self.models
                          for s in self.seeds]

    def _sparsity_levels(self):
        """The ``sparsity:`` axis (fractions of the training data kept, as floats), or None."""
        raw, err = self.raw, self.errors
        levels = raw.get("sparsity")
        if levels is None:
            return None
        if not isinstance(levels, list) or not levels:
            err.add(_key_line(raw, "sparsity"), "sparsity", "must be a non-empty list of fractions of the training "
                    f"data kept, in (0, 1], e.g. [1.0, 0.5, 0.25]; got {levels!r}")
            return None
        out = []
        for i, k in enumerate(levels):
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
                err.add(_item_line(levels, i), f"sparsity[{i}]",
                        f"a level is the fraction of the training data kept, in (0, 1], got {k!r}")
            elif float(k) in out:
                err.add(_item_line(levels, i), f"sparsity[{i}]", f"level {k:g} is listed twice")
            else:
                out.append(float(k))
        return out

    def _name_list(self, key, required, variants=False):
        """The names listed under ``key`` (and, with ``variants``, its mapping entries as they are)."""
        raw, err = self.raw, self.errors
        value = raw.get(key)
        if value is None:
            if required:
                err.add(getattr(raw, "line", None), key, f"missing: the study needs a list of {key}")
            return []
        if isinstance(value, str):
            value = _LineList([value])
            value.item_lines = [_key_line(raw, key)]
        if not isinstance(value, list) or not value:
            err.add(_key_line(raw, key), key, f"must be a non-empty list of names, got {value!r}")
            return []
        names = []
        for i, v in enumerate(value):
            if variants and isinstance(v, dict):
                names.append(v)
            elif _bad_name(v):
                err.add(_item_line(value, i), f"{key}[{i}]", f"must be a name, got {v!r}")
            elif v in names:
                err.add(_item_line(value, i), f"{key}[{i}]", f"{v!r} is listed twice")
            else:
                names.append(v)
        if isinstance(raw.get(key), str):
            raw[key] = value
        return names

    def _variant(self, entry, path, line):
        """A ``models:`` entry ``{name, model, config, role}``: the variant (its model not looked up
        yet), or None when it is malformed (errors added)."""
        from recbole_mm.registry import get_model

        err, count = self.errors, len(self.errors.items)
        for key in entry:
            if key not in VARIANT_KEYS:
                err.add(_key_line(entry, key), f"{path}.{key}", f"unknown key for a model variant"
                        f"{_suggest(key, VARIANT_KEYS)}; known: {', '.join(VARIANT_KEYS)}")
        name, model, config, role = (entry.get(k) for k in VARIANT_KEYS)
        if _bad_name(name):
            err.add(_key_line(entry, "name"), f"{path}.name", f"a variant needs a name (no / or \\), got {name!r}")
        else:  # a model's name (any case) would be ambiguous in proposed and model_config
            with contextlib.suppress(Exception):
                err.add(_key_line(entry, "name"), f"{path}.name", f"{name!r} is the name of the model "
                        f"{get_model(name).__name__}: a variant needs a name of its own")
        if not isinstance(model, str) or not model:
            err.add(line, path, "a variant needs the model it runs, e.g. "
                    "{name: SASRec+bucketing, model: SASRec, config: {length_bucketing: True}}")
        config = _LineDict() if config is None else config
        if not isinstance(config, dict):
            err.add(_key_line(entry, "config"), f"{path}.config", f"must be a mapping of config keys, got {config!r}")
        if role not in (None, "baseline", "proposed"):
            err.add(_key_line(entry, "role"), f"{path}.role", f"must be baseline or proposed, got {role!r}")
        if len(err.items) > count:
            return None
        return {"name": name, "model": model, "config": config, "role": role, "path": path}

    def model_of(self, label):
        """The model class name a cell label runs (a variant's model, else the label itself)."""
        return self.variants[label]["model"] if label in self.variants else label

    def base_models(self):
        """The models of the study's variants that are not listed themselves."""
        return list(dict.fromkeys(v["model"] for v in self.variants.values() if v["model"] not in self.models))

    def _mapping(self, key):
        value = self.raw.get(key)
        if value is None:
            return _LineDict()
        if not isinstance(value, dict):
            self.errors.add(_key_line(self.raw, key), key, f"must be a mapping of config keys, got {value!r}")
            return _LineDict()
        return value

    def _nested(self, key, allowed, aliases):
        outer = self._mapping(key)
        result = {}
        for name, inner in outer.items():
            line = _key_line(outer, name)
            canonical = aliases.get(name, name) if aliases else name
            if canonical not in allowed:
                what = "models" if key == "model_config" else "datasets"
                self.errors.add(line, f"{key}.{name}", f"{name!r} is not one of the study's {what} "
                                f"{allowed}{_suggest(name, allowed)}")
                continue
            if inner is None:
                inner = _LineDict()
            if not isinstance(inner, dict):
                self.errors.add(line, f"{key}.{name}", f"must be a mapping of config keys, got {inner!r}")
                continue
            result[canonical] = inner
        return result

    def _override_maps(self):
        yield "config", self.config
        for d, m in self.dataset_config.items():
            yield f"dataset_config.{d}", m
        for name, m in self.model_config.items():
            yield f"model_config.{name}", m
        for v in self.variants.values():
            yield f"{v['path']}.config", v["config"]

    def _validate_metrics(self):
        raw, err = self.raw, self.errors
        from recbole.evaluator.register import metrics_dict

        if self.metrics is not None:
            if isinstance(self.metrics, str):
                self.metrics = [self.metrics]
            if not isinstance(self.metrics, list) or not self.metrics:
                err.add(_key_line(raw, "metrics"), "metrics", "must be a non-empty list, e.g. [Hit, NDCG]")
                self.metrics = None
            else:
                for i, m in enumerate(self.metrics):
                    if not isinstance(m, str) or m.lower() not in metrics_dict:
                        err.add(_item_line(raw["metrics"], i), f"metrics[{i}]", f"unknown RecBole metric {m!r}"
                                f"{_suggest(str(m).lower(), metrics_dict)}; known: {', '.join(sorted(metrics_dict))}")
        if self.topk is not None:
            if isinstance(self.topk, int) and not isinstance(self.topk, bool):
                self.topk = [self.topk]
            if not isinstance(self.topk, list) or not self.topk or not all(
                    isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in self.topk):
                err.add(_key_line(raw, "topk"), "topk", f"must be a list of positive integers, got {self.topk!r}")
                self.topk = None
        report = raw.get("report")
        self.report = None
        if report is not None:
            if not isinstance(report, list) or not report:
                err.add(_key_line(raw, "report"), "report", "must be a non-empty list like [hit@10, ndcg@10]")
            else:
                self.report = []
                for i, r in enumerate(report):
                    name = str(r).lower()
                    base = name.split("@")[0]
                    if base not in metrics_dict or ("@" in name and not name.split("@", 1)[1].isdigit()):
                        err.add(_item_line(report, i), f"report[{i}]", f"{r!r} is not a metric like hit@10")
                    elif self.metrics and self.topk and name not in {
                            f"{m.lower()}@{k}" for m in self.metrics for k in self.topk}:
                        err.add(_item_line(report, i), f"report[{i}]", f"{r!r} is not computed: it is not among "
                                "metrics x topk")
                    else:
                        self.report.append(name)
        elif self.metrics and self.topk:
            self.report = [f"{m.lower()}@{k}" for m in self.metrics for k in self.topk]

    def _validate_sources(self):
        raw = self._mapping("sources")
        sources = {}
        for name, entry in raw.items():
            line = _key_line(raw, name)
            if name not in self.datasets:
                self.errors.add(line, f"sources.{name}", f"{name!r} is not one of the study's datasets "
                                f"{self.datasets}{_suggest(name, self.datasets)}")
                continue
            if not isinstance(entry, dict) or "type" not in entry:
                self.errors.add(line, f"sources.{name}", "must be a mapping with a type "
                                f"({', '.join(SOURCE_TYPES)}), e.g. {{type: ninerec, path: raw/{name}}}")
                continue
            kind = entry["type"]
            if kind not in SOURCE_TYPES:
                self.errors.add(_key_line(entry, "type"), f"sources.{name}.type",
                                f"unknown source type {kind!r}; known: {', '.join(SOURCE_TYPES)}")
                continue
            allowed = {"type"} | set(SOURCE_TYPES[kind]["required"]) | set(SOURCE_TYPES[kind]["optional"])
            for key in entry:
                if key not in allowed:
                    self.errors.add(_key_line(entry, key), f"sources.{name}.{key}",
                                    f"unknown key for a {kind} source{_suggest(key, allowed)}; known: {sorted(allowed)}")
            for key in SOURCE_TYPES[kind]["required"]:
                if key not in entry:
                    self.errors.add(line, f"sources.{name}", f"a {kind} source needs {key!r}")
            resolved = {k: (os.path.abspath(str(v)) if k in ("path", "reviews", "meta", "image_dir") else v)
                        for k, v in entry.items()}
            if kind == "ninerec" and "path" not in resolved:
                resolved["path"] = default_ninerec_path(name)
            resolved["_line"] = line
            sources[name] = resolved
        return sources

    # ------------------------------------------------------------------ per-cell config
    def cell_overrides(self, dataset, model):
        """The user's config for one cell, lowest priority first (no study-forced keys)."""
        cfg = {"show_progress": False}
        cfg.update(_plain(self.config))
        if self.metrics is not None:
            cfg["metrics"] = list(self.metrics)
        if self.topk is not None:
            cfg["topk"] = list(self.topk)
        cfg.update(_plain(self.dataset_config.get(dataset, {})))
        for key in dict.fromkeys((self.model_of(model), model)):  # a variant: its model's entry, then its own
            cfg.update(_plain(self.model_config.get(key, {})))
        if model in self.variants:
            cfg.update(_plain(self.variants[model]["config"]))
        cfg.update(self.overrides)
        return cfg

    def _build_config(self, model, dataset, config_dict, files=True):
        return _build_mmconfig(model, dataset, config_dict, (self.config_files or None) if files else None)

    def _validate_config_keys_and_datasets(self):
        err = self.errors
        # 1. where each dataset lives, and whether it is there or can be built
        self.data_dirs, self.to_build = {}, {}
        datasets_list = self.raw.get("datasets")
        for i, d in enumerate(self.datasets):
            line = _item_line(datasets_list, i) if isinstance(datasets_list, list) else None
            overrides = {k: v for k, v in self.cell_overrides(d, self.models[0]).items()
                         if k not in RESERVED_CONFIG_KEYS}
            if "data_path" in overrides:
                overrides["data_path"] = os.path.abspath(str(overrides["data_path"]))
            try:
                cfg = self._build_config(self.model_of(self.models[0]), d, overrides)
            except Exception as exc:  # noqa: BLE001
                err.add(line, f"datasets[{i}]", f"RecBole cannot configure dataset {d!r}: {type(exc).__name__}: {exc}")
                continue
            data_dir = os.path.abspath(os.path.normpath(cfg["data_path"]))
            self.data_dirs[d] = data_dir
            benchmark = cfg["benchmark_filename"]
            if _dataset_present(data_dir, d, benchmark):
                continue
            source = self.sources.get(d) or default_source(d)
            if source is None:
                err.add(line, f"datasets[{i}]", f"dataset {d!r} not found: no {d}.inter in {data_dir} and no "
                        f"source to build it from (add sources: {{{d}: {{type: ninerec|movielens|amazon, ...}}}}, "
                        "or set data_path)")
                continue
            src_line = source.get("_line", line)
            paths = [source[k] for k in ("path", "reviews", "meta") if k in source]
            absent = [p for p in paths if not os.path.exists(p)]
            if absent:
                hint = f" (set {NINEREC_ENV} or the source's path)" if source["type"] == "ninerec" else ""
                err.add(src_line, f"datasets[{i}]" if d not in self.sources else f"sources.{d}",
                        f"dataset {d!r} not found in {data_dir} and its {source['type']} source is missing: "
                        f"{', '.join(absent or paths)}{hint}")
                continue
            if benchmark and source["type"] != "ninerec":
                err.add(line, f"datasets[{i}]", f"benchmark files {benchmark} can only be built by a ninerec source")
                continue
            self.to_build[d] = source
        if len(self.data_dirs) < len(self.datasets):
            return

        # 2. config keys: each must be known to RecBole or the plugin for some cell it applies to;
        # each cell's defaults (RecBole's and the plugin's YAML files) are snapshotted on the way
        known = {}  # (dataset, model) -> keys RecBole and the plugin know for that cell
        for d in self.datasets:
            for m in self.models:
                try:
                    cfg = self._build_config(self.model_of(m), d, {"data_path": os.path.dirname(self.data_dirs[d])},
                                             files=False)
                except Exception as exc:  # noqa: BLE001
                    err.add(self._model_lines.get(m), f"models ({m} on {d})",
                            f"RecBole cannot configure {m} on {d}: {type(exc).__name__}: {exc}")
                    return
                known[d, m] = known_keys(cfg) | EXTRA_CONFIG_KEYS  # the validator single runs use
                self.defaults[d, m] = config_defaults(cfg)
        all_keys = set().union(*known.values()) if known else set()

        def check_values(path, mapping, cells):
            # each value against the defaults of every cell it applies to (a key's type is per model)
            seen = set()
            for cell in cells:
                for key, message in value_problems(self.defaults.get(cell) or {}, mapping):
                    if key not in seen:
                        seen.add(key)
                        err.add(_key_line(mapping, key), f"{path}.{key}", message)

        def check(path, mapping, keys, cells):
            check_values(path, mapping, cells)
            for key in mapping:
                if key in keys or key in RESERVED_CONFIG_KEYS:
                    continue
                message = (f"unknown config key {key!r}{_suggest(key, keys)}: no RecBole or recbole_mm "
                           "default, model or dataset file defines it (set strict_keys: false to allow it)")
                (err.add if self.strict_keys else err.warn)(_key_line(mapping, key), f"{path}.{key}", message)

        check("config", self.config, all_keys, list(known))
        for d, mapping in self.dataset_config.items():
            check(f"dataset_config.{d}", mapping, set().union(*(known[d, m] for m in self.models)),
                  [(d, m) for m in self.models])
        for key, mapping in self.model_config.items():  # a model's entry applies to its variants too
            cells = [(d, m) for d in self.datasets for m in self.models if key in (m, self.model_of(m))]
            check(f"model_config.{key}", mapping, set().union(*(known[c] for c in cells)), cells)
        for m, v in self.variants.items():
            check(f"{v['path']}.config", v["config"], set().union(*(known[d, m] for d in self.datasets)),
                  [(d, m) for d in self.datasets])
        seen = set()
        for cell in known:
            for key, message in value_problems(self.defaults.get(cell) or {}, self.overrides):
                if key not in seen:
                    seen.add(key)
                    err.add(None, f"command line --{key}", message)
        for key in self.overrides:
            if key not in all_keys and key not in RESERVED_CONFIG_KEYS:
                (err.add if self.strict_keys else err.warn)(
                    None, f"command line --{key}", f"unknown config key{_suggest(key, all_keys)}")

    # ------------------------------------------------------------------ paths
    def cell_dir(self, dataset, model):
        return os.path.join(self.output_dir, "records", dataset, model)

    def cell_paths(self, dataset, model, seed, sparsity=None):
        """A cell's files; with a sparsity level (the study's ``sparsity:`` axis) in a ``keep<level>``
        folder below the model's."""
        level = [] if sparsity is None else [level_name(sparsity)]
        base = os.path.join(self.cell_dir(dataset, model), *level, f"seed{seed}")
        return {
            "record": base + ".json",
            "failed": base + ".failed.json",
            "cell": base + ".cell.json",
            "lock": base + ".lock",
            "log": os.path.join(self.output_dir, "logs", dataset, model, *level, f"seed{seed}.log"),
        }

    def finished_record(self, dataset, model, seed, sparsity=None):
        """The complete record of a finished cell, else None."""
        return complete_record(self.cell_paths(dataset, model, seed, sparsity)["record"], dataset,
                               self.model_of(model), seed, sparsity)

    def cell_spec(self, dataset, model, seed, sparsity=None):
        """Everything one cell (``model``: its label) needs; ``fingerprint`` identifies its configuration."""
        paths = self.cell_paths(dataset, model, seed, sparsity)
        config = self.cell_overrides(dataset, model)
        level = []
        if sparsity is not None:
            config["sparsity_keep"] = sparsity
            level = [level_name(sparsity)]
        config["data_path"] = os.path.dirname(self.data_dirs[dataset])
        if "checkpoint_dir" in config:
            config["checkpoint_dir"] = os.path.abspath(str(config["checkpoint_dir"]))
        ident = {"model": self.model_of(model), "dataset": dataset, "seed": seed, "config_dict": config,
                 "config_files": [[f, _file_sha(f)] for f in self.config_files]}
        fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
        forced = dict(config, seed=seed, record_path=paths["record"], record_runs=True)
        if not self.strict_keys:  # the study allowed unknown keys (with warnings): so does the cell's run
            forced["strict_config_keys"] = False
        # one folder per level: RecBole's saved dataloaders (save_dataloaders) do not check sparsity_keep
        forced.setdefault("checkpoint_dir", os.path.join(self.output_dir, "saved", dataset, model, *level))
        return {
            "model": self.model_of(model), "name": model, "dataset": dataset, "seed": seed,
            **({} if sparsity is None else {"sparsity": sparsity}),
            "config_files": list(self.config_files), "config_dict": forced,
            "user_config": config, "fingerprint": fingerprint,
            # what the cell's configuration also depends on, as of this study start: the default
            # values from RecBole's and the plugin's YAML files, and the config files' contents.
            # Kept out of the fingerprint so that cells finished before these were recorded stay valid.
            "defaults": self.defaults.get((dataset, model)),
            "config_file_shas": [[f, _file_sha(f)] for f in self.config_files],
            "keep_checkpoints": self.keep_checkpoints,
            # a folder the study's runs share (a run may publish there what another model reuses, e.g.
            # a SASRec cell as SICSRec's step 1: registry.ModelSpec.publishers); not for variants, whose
            # settings the publishers' keys may not cover
            "share_dir": (os.path.join(self.output_dir, "saved") if self.keep_checkpoints and model not in self.variants
                          else None),
            **paths,
        }


def level_name(sparsity):
    """A sparsity level in folder and file names: ``keep0.5``."""
    return f"keep{sparsity:g}"


def cell_text(dataset, model, seed, sparsity=None):
    """A cell in messages: ``Bili_Food / SASRec / seed 2020`` (``/ keep 0.5`` on the sparsity axis)."""
    return f"{dataset} / {model} / seed {seed}" + ("" if sparsity is None else f" / keep {sparsity:g}")


def _build_mmconfig(model, dataset, config_dict, config_files=None):
    from recbole_mm.config import MMConfig

    # the study checks its own keys and values (with its file's line numbers), below
    with _config_env():
        return MMConfig(model=model, dataset=dataset, config_file_list=config_files or None,
                        config_dict=config_dict, validate=False)


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def config_defaults(cfg):
    """A config's default values (RecBole's and the plugin's YAML files, before any user
    setting), as plain JSON values: what a cell's configuration depends on besides the study."""
    return _jsonable(cfg.internal_config_dict)


def _file_sha(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None


def validate_study(path_or_dict, output_dir=None, overrides=None):
    """Load and validate a study without running anything; returns the :class:`Study`."""
    if isinstance(path_or_dict, dict):
        return Study(path_or_dict, "<dict>", output_dir, overrides)
    path = os.fspath(path_or_dict)
    return Study(load_study(path), path, output_dir, overrides)


# ============================================================================ records


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def complete_record(path, dataset=None, model=None, seed=None, sparsity=None):
    """The record at ``path`` if it is a complete, finished run of that cell, else None."""
    rec = _read_json(path)
    if not isinstance(rec, dict) or rec.get("status") != "finished":
        return None
    if not isinstance(rec.get("test_result"), dict) or not rec["test_result"]:
        return None
    if not isinstance(rec.get("best_valid_result"), dict):
        return None
    for key, want in (("dataset", dataset), ("model", model), ("seed", seed)):
        if want is not None and rec.get(key) != want:
            return None
    config = rec.get("config")
    if sparsity is not None and isinstance(config, dict):  # a run at another level is not this cell's
        kept = config.get("sparsity_keep")
        if not isinstance(kept, (int, float)) or abs(float(kept) - sparsity) > 1e-9:
            return None
    return rec


def _write_json(path, payload):
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def _dict_changes(before, after, skip=()):
    """``(key, old, new)`` for each key whose value differs (``'(none)'`` where absent)."""
    missing = object()
    return [(k, before.get(k, "(none)"), after.get(k, "(none)")) for k in sorted(set(before) | set(after), key=str)
            if k not in skip and before.get(k, missing) != after.get(k, missing)]


# where things are, not what runs: a study folder committed or copied to another machine, whose
# datasets live elsewhere there, resumes (the dataset is still named by its name)
LOCATION_KEYS = ("data_path", "share_dir")


# defaults added after cells may have been run, which leave a run on clean data as it was (issues 15-16:
# duplicate/repeat checks that only act on duplicated data, a key check done before the run, and
# text values read as missing, which the feature's input checksum already covers; features encoded
# only for the items a dataset uses, which are the same vectors; the CPU thread
# count): a cell whose recorded defaults lack them is not "run with a different configuration"
BEHAVIOUR_KEEPING_DEFAULTS = (
    "duplicate_interactions", "consecutive_repeats", "strict_config_keys", "cpu_threads",
    # the same samples, order and scores (tests/test_lazy.py); bucketing's default (False) is the old behaviour
    "sequence_samples", "trim_batches", "length_bucketing", "bucket_pool_batches", "ce_memory_mb", "eval_memory_mb",
    "contrastive_memory_mb",
    # softmax: full (the default) is the exact CE as before (tests/test_softmax.py)
    "softmax", "sampled_negatives", "n_sampled_negatives", "logq_correction",
    # missing_modality: zero is today's content vectors bit for bit (tests/test_missing_modality.py); the
    # finetune caches' budgets decide what is recomputed, not the values (float32 default: exact)
    "missing_modality", "encoder_cache_mb", "encoder_cache_dtype", "sft_cache_mb", "sft_cache_dtype",
    # sparsity_keep: 1.0 (the default) thins nothing: the same training samples (tests/test_sparsity.py)
    "sparsity_keep", "sparsity_mode", "sparsity_seed",
    # cold_items: 0.0 holds nothing out (tests/test_cold_start.py); eval_item_sets adds record fields only;
    # activation checkpointing recomputes the same blocks (tests/test_tssr.py); a memory-mapped aligned
    # feature table holds the same values (tests/test_shared_tables.py)
    "cold_items", "cold_items_after", "cold_seed", "eval_item_sets", "activation_checkpointing", "feature_table_mmap",
    # cold_item_rule acts only with cold items (none at the defaults); cells with cold items run before it
    # existed used the mean rule, so such a study is rerun (benchmarks/results/cold_sparsity_food was)
    "cold_item_rule", "cold_item_neighbours",
    # sparse_table_updates: False (the default) is the dense update as before
    "sparse_table_updates",
    # finetune with images / LoRA (new): act only under content_mode: finetune with an image modality or
    # encoder_peft: lora, neither of which existed before; the pixel cache's budget decides what is
    # decoded again, not the values
    "image_encoder", "image_trainable_layers", "image_pooling", "image_cache_pixels", "image_pixel_cache_mb",
    "encoder_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target", "side_bottleneck",
    "sft_peft", "sft_lora_r", "sft_lora_alpha", "sft_lora_dropout", "sft_lora_target",
)
BEHAVIOUR_KEEPING_FEATURE_KEYS = ("missing_values", "encode_items")  # encode_items: unused items are never aligned


def _without_added_defaults(old_defaults, new_defaults):
    """``new_defaults`` less the behaviour-keeping defaults that ``old_defaults`` did not have yet."""
    new = {k: v for k, v in new_defaults.items()
           if not (k in BEHAVIOUR_KEEPING_DEFAULTS and k not in old_defaults)}
    old_specs, new_specs = old_defaults.get("mm_features"), new.get("mm_features")
    if isinstance(old_specs, dict) and isinstance(new_specs, dict):
        new["mm_features"] = {
            name: ({k: v for k, v in spec.items() if not (k in BEHAVIOUR_KEEPING_FEATURE_KEYS and k not in
                                                          (old_specs.get(name) or {}))}
                   if isinstance(spec, dict) else spec)
            for name, spec in new_specs.items()}
    return new


def config_changes(old, spec):
    """How a finished cell's configuration (``old``, its cell file) differs from ``spec``'s now.

    Cells that recorded their defaults are compared on the configuration in effect (the user's
    settings over the defaults), so a default that changed is caught, and pinning the old value
    in the study is not a change. ``data_path`` (where the datasets are) is not compared. Older
    cells (no defaults recorded) compare the fingerprint.
    """
    before, now = old.get("user_config") or {}, _jsonable(spec["user_config"])
    diff = [f"model: {old['model']!r} -> {spec['model']!r}"] if old.get("model") not in (None, spec["model"]) else []
    if old.get("config_files") != spec["config_files"]:
        diff.append("config_files changed")
    elif old.get("config_file_shas") not in (None, spec["config_file_shas"]):
        diff.append("config file contents changed")
    if isinstance(old.get("defaults"), dict) and isinstance(spec.get("defaults"), dict):
        was = dict(old["defaults"], **before)
        is_ = dict(_without_added_defaults(old["defaults"], _jsonable(spec["defaults"])), **now)
        for k, a, b in _dict_changes(was, is_, skip=LOCATION_KEYS):
            diff.append(f"{k}: {a!r} -> {b!r}" + ("" if k in before or k in now else " (a default)"))
        return diff
    if old.get("fingerprint") in (None, spec["fingerprint"]):
        return []
    diff += [f"{k}: {a!r} -> {b!r}" for k, a, b in _dict_changes(before, now)]
    return diff or ["config file contents changed"]


def changed_since_study_start(spec):
    """What changed, between the study's start and now, in the files a cell's configuration is
    read from when it starts: the config files, and RecBole's and the plugin's YAML defaults
    (keys the study sets itself do not count). Empty when nothing did."""
    changes = [f"config file {f} changed" for f, sha in spec.get("config_file_shas") or [] if _file_sha(f) != sha]
    if isinstance(spec.get("defaults"), dict):
        cfg = _build_mmconfig(spec["model"], spec["dataset"], {"data_path": spec["config_dict"]["data_path"]})
        changes += [f"default {k}: {a!r} -> {b!r}" for k, a, b in
                    _dict_changes(spec["defaults"], _without_added_defaults(spec["defaults"], config_defaults(cfg)),
                                  skip=spec.get("user_config") or {})]
    return changes


def _check_finished_specs(study):
    """A finished cell whose configuration changed since is an error (before any training)."""
    changed = []
    for cell in study.cells:
        spec = study.cell_spec(*cell)
        # any model: a variant's may have changed
        if complete_record(spec["record"], spec["dataset"], None, spec["seed"], spec.get("sparsity")) is None:
            continue
        old = _read_json(spec["cell"])
        diff = config_changes(old, spec) if isinstance(old, dict) else []
        if diff:
            changed.append(f"  {cell_text(*cell)}: " + "; ".join(diff))
    if changed:
        raise StudyError(
            f"{study.source}: {len(changed)} finished cell(s) in {study.output_dir} were run with a different "
            "configuration; a study never mixes configurations. Use another output_dir, delete those "
            "cells' records to rerun them, or, for a changed default (a value from RecBole's or the plugin's "
            "properties/*.yaml), set its old value in the study's config or model_config:\n" + "\n".join(changed[:20])
            + (f"\n  ... and {len(changed) - 20} more" if len(changed) > 20 else ""))
