"""YAML studies: datasets x models x seeds, one fresh subprocess per cell, resumable, with tables.

A study YAML (see ``docs/STUDIES.md`` and ``properties/study/``) names datasets, models (plugin
or RecBole, or variants of them with their own config), seeds, shared and per-model / per-dataset
config overrides, the metrics to report and an output folder. Each cell (dataset, model, seed; with a
``sparsity:`` list also the fraction of the training data kept, ``sparsity_keep``) is one
``recbole_mm.quick_start.run_recbole_mm(..., saved=True)`` run in its own Python process, with
``record_path`` pointing at the cell's record in the study folder; the runner writes that JSON
atomically on success (``.failed.json`` on failure).

Resuming: a cell is finished iff its record exists and is complete; finished cells are never
run again and their records are never written. Killing the study (or a cell) at any point
loses at most the running cell. A finished cell whose configuration has changed since is an
error (before any training), never a silent mix of configurations.

Outputs in the study folder: ``cells.csv``, ``cells.json``, ``tables/<dataset>.md`` (mean ± std
over seeds with 95% t confidence intervals, best in bold, relative improvement of each proposed
model over the best baseline with a paired t-test across seeds, p-values adjusted for multiple
comparisons over the whole report: ``p_adjust``, :func:`holm`, :func:`benjamini_hochberg`; test
metrics per slice of the test users from the records' ``test_slices``: :func:`slices_table`),
``results.md`` (all tables, machine, wall time per cell) and ``plots/<dataset>_metrics.png`` /
``plots/<dataset>_valid.png``. With the sparsity axis: each dataset's tables and plots once per
level (``plots/<dataset>_keep<level>_*.png``) after a table of accuracy vs sparsity per model
(:func:`sparsity_table`) and ``plots/<dataset>_sparsity.png``.

Entry points: :func:`run_study`, ``python run_recbole_mm.py --study <file.yaml>`` (:func:`main`).

Package layout (each module imports only those above it in this list):

- ``spec``: the line-tracking YAML loader, the study's keys and validation (:class:`Study`,
  :func:`validate_study`), dataset sources, cell specs and paths, run records, config drift checks
  (``LOCATION_KEYS``, ``BEHAVIOUR_KEEPING_DEFAULTS``);
- ``collection``: records into rows (:func:`collect_cells`), metric names;
- ``stats``: paired t-tests, p-value adjustment (:func:`holm`, :func:`benjamini_hochberg`,
  :class:`PFamily`), confidence intervals (:func:`ci_half_width`), comparisons per dataset;
- ``plots``: matplotlib plots;
- ``report``: Markdown tables, CSV/JSON, ``results.md`` (:func:`write_report`);
- ``execution``: cells as subprocesses (locks, signals, child environment, ``--run-cell``, ``--jobs``)
  and :func:`run_study`;
- ``cli``: the command line (:func:`main`); ``python -m recbole_mm.study`` runs it (``__main__``).

Every name of the former single module ``recbole_mm/study.py`` is importable from here as before.
"""

import os  # noqa: F401 - as before, recbole_mm.study.os (tests patch os.sched_getaffinity through it)

from recbole_mm.study.spec import (BEHAVIOUR_KEEPING_DEFAULTS, BEHAVIOUR_KEEPING_FEATURE_KEYS,
                                   EXTRA_CONFIG_KEYS, LOCATION_KEYS, NINEREC_ENV, P_ADJUST_METHODS,
                                   RESERVED_CONFIG_KEYS, SOURCE_TYPES, STUDY_KEYS, Study, StudyError,
                                   VARIANT_KEYS, _Errors, _LineDict, _LineList, _LineLoader, _bad_name,
                                   _build_mmconfig, _check_finished_specs, _config_env, _construct_mapping,
                                   _construct_sequence, _dataset_present, _dict_changes, _file_sha,
                                   _item_line, _jsonable, _key_line, _model_role, _parse_value, _plain,
                                   _read_json, _repo_root, _suggest, _without_added_defaults, _write_json,
                                   cell_text, changed_since_study_start, complete_record, config_changes,
                                   config_defaults, default_ninerec_path, default_source, level_name,
                                   load_study, validate_study)  # noqa: F401
from recbole_mm.study.collection import (METRIC_NAMES, _first_stage, _metric_label, _smaller_is_better,
                                         collect_cells)  # noqa: F401
from recbole_mm.study.stats import (CI_LEVEL, PFamily, P_ADJUST_FULL_NAMES, P_ADJUST_FUNCTIONS, _adjust_all,
                                    _fmt_p, _in_family, _mean_std, _paired_metric, _paired_test, _tested,
                                    benjamini_hochberg, ci_half_width, dataset_summary, holm,
                                    within_seed_noise)  # noqa: F401
from recbole_mm.study.plots import (_figure, _save_figure, plot_metrics, plot_sparsity, plot_valid_curves)  # noqa: F401
from recbole_mm.study.report import (CI_SENTENCE, SLICE_TITLES, _CSV_FIXED, _cells_ran_on, _comparison_text,
                                     _csv_text, _dataset_table, _epoch_time_text, _epochs_part, _epochs_text,
                                     _fmt, _fmt_mean_std, _mean_header, _paired_rows, _range_text,
                                     _report_metrics, _slice_metrics, _stage_table, _valid_family,
                                     _variants_table, _wall_text, dataset_table, machine_info, slices_table,
                                     sparsity_table, stage_table, variants_table, write_report)  # noqa: F401
from recbole_mm.study.execution import (CELL_LOCK_WAIT_S, EXIT_BUSY, EXIT_DEFAULTS_CHANGED, INTERRUPTED_CODES,
                                        StudyTerminated, _cell_threads, _cell_worker, _child_env,
                                        _prepare_datasets, _run_cell, _run_cells_parallel,
                                        _set_parent_death_signal, _sigterm_as_interrupt, _spec_text, _stop,
                                        _study_lock, run_study)  # noqa: F401
from recbole_mm.study.cli import (add_study_options, build_parser, main)  # noqa: F401

__all__ = ["run_study", "load_study", "validate_study", "main", "StudyError"]
