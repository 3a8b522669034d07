"""One config validator for single runs, ``tune`` and studies.

RecBole's ``Config`` accepts any key: ``hiden_size: 16`` in a YAML file or ``--hiden_size=16``
runs with ``hidden_size: 64`` and says nothing, ``hidden_size: abc`` fails deep in a layer, and a
``valid_metric`` that ``metrics`` x ``topk`` does not produce fails after a whole epoch.
:func:`validate_config` runs when a :class:`~recbole_mm.config.MMConfig` is built, before any
data is loaded, and raises :class:`ConfigError` naming the key, where it was set (file and line,
command line or ``config_dict``), a "did you mean" and the expected type.

The known keys are derived, not listed: every key with a default (RecBole's and the plugin's
YAML files, for every model and dataset they ship) plus every key RecBole's or the plugin's code
reads (``config["key"]``, ``config.get("key")``, ...), found by scanning their source once per
process. ``strict_config_keys: False`` turns unknown keys into warnings.
"""

from __future__ import annotations

import difflib
import functools
import glob
import logging
import os
import re

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or setting the run cannot use; the message names where it was set and the fix."""


# keys read by launchers or set by RecBole at run time, without a YAML default
EXTRA_KEYS = {"mm_feature_names", "nproc", "world_size", "offset", "ip", "port", "local_rank",
              "config_files", "model", "dataset"}

_READ_PATTERNS = (
    re.compile(r"""(?:config|cfg|conf|self\.config|self\._config)\s*\[\s*["']([A-Za-z_]\w*)["']\s*\]"""),
    re.compile(r"""(?:config|cfg|conf|self\.config|final_config_dict)\s*\.get\(\s*["']([A-Za-z_]\w*)["']"""),
    re.compile(r"""_opt\(\s*\w+\s*,\s*["']([A-Za-z_]\w*)["']"""),
    re.compile(r"""["']([A-Za-z_]\w*)["']\s+in\s+(?:config|cfg|self\.config)\b"""),
)


def _package_dir(name):
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=None)
def _file_read_keys(path) -> frozenset:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return frozenset()
    return frozenset(k for pattern in _READ_PATTERNS for k in pattern.findall(text))


@functools.lru_cache(maxsize=None)
def code_read_keys() -> frozenset:
    """Config keys RecBole's and the plugin's source read (scanned once per process)."""
    keys = set()
    for pkg in ("recbole", "recbole_mm"):
        root = _package_dir(pkg)
        if root is None:
            continue
        for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
            keys |= _file_read_keys(path)
    return frozenset(keys)


@functools.lru_cache(maxsize=None)
def yaml_default_keys() -> frozenset:
    """Top-level keys of every YAML file RecBole and the plugin ship (all models, all datasets)."""
    import yaml

    from recbole_mm.config import properties_dir

    roots = [properties_dir()]
    recbole_root = _package_dir("recbole")
    if recbole_root:
        roots.append(os.path.join(recbole_root, "properties"))
    keys = set()
    for root in roots:
        for path in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True):
            if os.sep + "study" + os.sep in path:  # study files are not configs
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                keys.update(str(k) for k in data)
    return frozenset(keys)


def model_read_keys(model_class) -> set:
    """Keys the source files of ``model_class`` and its bases read (a user's own model class too)."""
    import inspect

    keys = set()
    for cls in getattr(model_class, "__mro__", ()):
        try:
            path = inspect.getsourcefile(cls)
        except (TypeError, OSError):
            continue
        if path:
            keys |= _file_read_keys(path)
    return keys


def known_keys(config=None) -> set:
    """Keys a run may set: this config's defaults, every shipped YAML key, every key the code reads
    (RecBole, the plugin, and the model class's own files)."""
    keys = set(EXTRA_KEYS) | yaml_default_keys() | code_read_keys()
    if config is not None:
        keys |= set(config.internal_config_dict)
        keys |= model_read_keys(getattr(config, "model_class", None))
    return keys


def suggest(name, candidates) -> str:
    close = difflib.get_close_matches(str(name), sorted(str(c) for c in candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# ----------------------------------------------------------------------------- config files


def _yaml_error_text(path, exc):
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: malformed YAML: {problem}. Fix the file (indentation, a missing ':' or quote)."


def load_config_files(paths, loader=None):
    """Check and load config files: each must exist, be valid YAML and hold a mapping (an empty
    file is an empty mapping). Returns ``(data, lines)``: the merged settings (later files win, as
    in RecBole) and ``{path: {key: line}}`` for messages. Errors name the file and line."""
    import yaml

    data, lines = {}, {}
    for path in paths or []:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} not found (from --config_files / config_file_list; "
                              f"working directory {os.getcwd()}). Fix the path.")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        try:
            node = yaml.compose(text, Loader=loader or yaml.SafeLoader)
            values = yaml.load(text, Loader=loader or yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_error_text(path, exc)) from None
        if node is not None and not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{path}: a config file must be a mapping of keys to values "
                              f"(key: value lines), got a YAML {node.id}")
        lines[path] = {str(k.value): k.start_mark.line + 1 for k, _ in node.value} if node is not None else {}
        data.update(values or {})
    return data, lines


# ----------------------------------------------------------------------------- validation


def _where(config, key, file_lines):
    if key in (getattr(config, "cmd_config_dict", None) or {}):
        return f"command line --{key}"
    if key in (getattr(config, "variable_config_dict", None) or {}):
        return f"config_dict[{key!r}]"
    for path, keys in reversed(list(file_lines.items())):  # later files win in RecBole
        if key in keys:
            return f"{path}:{keys[key]}"
    return f"config key {key!r}"


def _type_name(value):
    if isinstance(value, bool):
        return "a boolean (True/False)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _type_ok(default, value):
    # a number's default type is not a contract: YAML files write 0 for rates (dropout_prob: 0 in
    # some RecBole model files), so any number is accepted where the default is a number; what is
    # refused is a string or a boolean there (hidden_size: abc), and a non-boolean for a boolean
    if value is None or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


# budgets and sizes that must be positive integers: a non-positive value trains or evaluates nothing
POSITIVE_INT_KEYS = ("epochs", "train_batch_size", "eval_batch_size", "MAX_ITEM_LIST_LENGTH",
                     "hidden_size", "n_layers", "n_heads")  # not eval_step: below 1 means "never validate"


def _valid_metric_problem(config):
    vm = config["valid_metric"]
    metrics = config["metrics"]
    if vm is None or metrics is None:
        return None
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    topk = config["topk"]
    topk = [topk] if isinstance(topk, int) else list(topk or [])
    from recbole.evaluator.register import metric_types
    from recbole.utils import EvaluatorType

    produced = []
    for m in metrics:
        if metric_types.get(str(m).lower()) == EvaluatorType.RANKING:
            produced += [f"{m}@{k}" for k in topk]
        else:
            produced.append(str(m))
    if str(vm).lower() in {p.lower() for p in produced}:
        return None
    return (f"valid_metric {vm!r} is not computed: metrics x topk gives {', '.join(produced)}. "
            "Set valid_metric to one of them, or add its metric to metrics / its cut-off to topk.")


def value_problems(defaults, settings):
    """``[(key, message)]`` for settings of the wrong type (judged by the default's type) and
    non-positive budgets/sizes; shared by runs and studies."""
    out = []
    for key, value in settings.items():
        if key in defaults and not _type_ok(defaults[key], value):
            out.append((key, f"{key} must be {_type_name(defaults[key])} (default {defaults[key]!r}), "
                             f"got {value!r} ({type(value).__name__})"))
        elif key in POSITIVE_INT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and (value <= 0 or not _is_int(value)):
            hint = " (a non-positive budget trains nothing)" if key == "epochs" and value <= 0 else ""
            out.append((key, f"{key} must be a positive integer, got {value!r}{hint}"))
    return out


def validate_config(config, file_lines=None, strict=None):
    """Check the user's settings of a built RecBole/plugin ``Config``; raise :class:`ConfigError`.

    ``file_lines`` ({path: {key: line}}) names files and lines in messages. ``strict`` (default:
    the config's ``strict_config_keys``, True) decides whether unknown keys stop the run or warn.
    Returns the warnings (unknown keys when not strict).
    """
    file_lines = file_lines or {}
    user = dict(config.external_config_dict)
    strict = config["strict_config_keys"] is not False if strict is None else strict
    problems, warnings = [], []
    known = known_keys(config)
    for key in user:
        if key not in known:
            text = (f"{_where(config, key, file_lines)}: unknown config key {key!r}{suggest(key, known)}; "
                    "no RecBole or recbole_mm default, model or dataset file defines it and no code reads it")
            (problems if strict else warnings).append(text)
    for key, message in value_problems(config.internal_config_dict, user):
        problems.append(f"{_where(config, key, file_lines)}: {message}")
    vm_problem = _valid_metric_problem(config)
    if vm_problem:
        problems.append(f"{_where(config, 'valid_metric', file_lines)}: {vm_problem}")
    for text in warnings:
        logger.warning(text + " (strict_config_keys: False, so it is ignored)")
    if problems:
        head = "invalid configuration:\n  " if len(problems) > 1 else ""
        raise ConfigError(head + "\n  ".join(problems))
    return warnings


def check_keys(keys, known, where, strict=True):
    """Unknown names among ``keys`` (e.g. a tune params file's parameters); raise or return warnings."""
    bad = [f"{where}: unknown config key {k!r}{suggest(k, known)}" for k in keys if k not in known]
    if bad and strict:
        raise ConfigError("\n  ".join(bad))
    return bad
