"""Trainers: RecBole's, plus what RecBole lacks.

``MMTrainer`` (and every RecBole trainer reached through ``registry.get_trainer``) loads
checkpoints with ``weights_only=False`` so the best-checkpoint reload works on torch >= 2.6
(recbole/trainer/trainer.py:323, :583; RecBole #2212), and keeps a per-epoch history of
training losses and validation scores for run records and plots.

It also makes RecBole's trainer safe to resume and to run under DDP:

* **resume**: besides RecBole's best checkpoint, a "last" checkpoint
  ``<checkpoint_dir>/<model>-<dataset>-<run key>-last.pth`` is written atomically after every
  epoch (model, optimizer, early-stopping counters, history and the python/numpy/torch/CUDA
  and data-loader random states of every rank). ``fit`` continues from it (config
  ``resume: auto|true|false``), so a killed run loses at most the epoch in progress and ends
  exactly where an uninterrupted run ends. The run key hashes the config that defines the
  run (not paths, logging or launcher settings).
* **DDP**: the model is wrapped with ``device_ids=None`` on CPU (RecBole passes
  ``[local_rank]``, which only works for CUDA modules); global rank 0 alone writes
  checkpoints and tensorboard files; every rank uses rank 0's checkpoint file name and waits
  (``dist.barrier``) until it is written; evaluation gathers every rank's rows (undoing
  ``DistributedSampler``'s interleaving and padding), so distributed metrics equal
  single-process metrics instead of RecBole's average of per-rank averages.

Package layout (each module imports only those above it in this list):

- ``ddp``: the DDP patches (CPU DDP construction, tensorboard on rank 0 only), the gathering
  evaluation collector, broadcast / gather / barrier helpers, the replicas' digests;
- ``checkpoints``: saving and loading checkpoints (``weights_only=False``), the run key and the
  last checkpoint's path, the process-global records of the last checkpoints written;
- ``resume``: the last checkpoint with the random states, resuming from it, ``resume_mode``;
- ``history``: the per-epoch history, ``format_metrics`` and the named loss terms;
- ``loop``: the fit loop (RecBole's ``Trainer.fit`` with the last checkpoint and resume);
- here: :class:`SafeLoadingMixin` assembled from the modules' mixins (plus the optimizer's
  parameter groups, the best checkpoint's name and the model protocol's hooks), :class:`MMTrainer`
  and :func:`with_safe_loading`.

Every name of the former single module ``recbole_mm/trainer.py`` is importable from here as before.
"""

import os

from recbole.evaluator import Collector  # noqa: F401  (as before, recbole_mm.trainer.Collector)
from recbole.trainer import Trainer

from recbole_mm.compat import torch_load  # noqa: F401  (as before, recbole_mm.trainer.torch_load)
from recbole_mm.atomic import atomic_path, torch_save_atomic  # noqa: F401  (as before)
from recbole_mm.utils import dist_rank_world  # noqa: F401  (also this module's name, as before)
from recbole_mm.trainer.ddp import (DDPMixin, GatheringCollector, _NullWriter, _null_tensorboard,
                                    all_gather_object, barrier, broadcast_object)  # noqa: F401
from recbole_mm.trainer.checkpoints import (RUN_KEY_IGNORED, _LAST_WRITTEN, _RESUMED_IN_RUN, CheckpointMixin,
                                            _canonical, forget_last_checkpoints, last_checkpoint_path,
                                            remove_last_checkpoints, run_key)  # noqa: F401
from recbole_mm.trainer.resume import ResumeMixin, resume_mode  # noqa: F401
from recbole_mm.trainer.history import HistoryMixin, format_metrics, format_named_losses  # noqa: F401
from recbole_mm.trainer.loop import FitLoopMixin


class SafeLoadingMixin(HistoryMixin, ResumeMixin, CheckpointMixin, DDPMixin, FitLoopMixin):
    """Checkpoint loading that works on torch >= 2.6, and a per-epoch history.

    A model may define ``optimizer_param_groups()`` (e.g. a smaller learning rate for an
    end-to-end content encoder); frozen parameters never reach the optimizer.
    """

    def __init__(self, config, model):
        distributed = not config["single_spec"]
        # DDPMixin.__init__: RecBole's Trainer.__init__ with the DDP patches (CPU DDP construction)
        super().__init__(config, model)
        # RecBole names the best checkpoint <model>-<time to the second>.pth: runs started in the
        # same second (a parallel study's seeds) would share it and test each other's models.
        base, ext = os.path.splitext(self.saved_model_file)
        self.saved_model_file = f"{base}-{run_key(config)}-{os.getpid()}{ext}"
        # RecBole's collector (gathering under DDP) that keeps the last evaluation's top-k rows
        self.eval_collector = GatheringCollector(config)
        if distributed:
            # RecBole names the best checkpoint after each rank's clock: use rank 0's name.
            self.saved_model_file = broadcast_object(self.saved_model_file)
        self.resumed_from = None
        # The runner keeps its trainer's finished last checkpoint until the test evaluation is
        # done (a run killed there resumes straight to it); a trainer used inside another
        # one's fit (SICSRec's step 1) deletes its own as soon as its fit returns.
        self.keep_finished_last_checkpoint = False
        if hasattr(model, "optimizer_param_groups"):
            # groups marked "sparse" (sparse embedding tables) get SparseAdam next to the learner
            from recbole_mm.optim import build_optimizer

            self.optimizer = build_optimizer(model.optimizer_param_groups(), self.learner, self.learning_rate,
                                             self.weight_decay, lambda groups: self._build_optimizer(params=groups))
        else:
            self.optimizer = self._build_optimizer(
                params=[p for p in model.parameters() if p.requires_grad]
            )

    # ------------------------------------------------------------------ hooks of the model protocol
    def extra_test_results(self, test_data, show_progress=False):
        """``name -> test metrics`` of other models this trainer holds, on the runner's test split
        (a multi-stage trainer's earlier stage, e.g. SICSRec's step-1 SASRec); {} by default. The
        runner calls it after the test and puts the results into the record's ``stages``."""
        return {}

    def stage_summaries(self):
        """The run's earlier stages, for the record's ``stages`` and study reports: a list of dicts
        with ``name`` (file- and column-safe), ``label`` (for tables), ``model``, ``epochs`` (trained
        here; None when reused), ``max_epochs``, ``reused``, ``description`` (one sentence for the
        report) and ``test_result`` (from :meth:`extra_test_results`); [] by default."""
        return []


class MMTrainer(SafeLoadingMixin, Trainer):
    """RecBole's ``Trainer`` with safe checkpoint loading and a training history."""


_WRAPPED = {Trainer: MMTrainer}


def with_safe_loading(trainer_class):
    """Return ``trainer_class`` with :class:`SafeLoadingMixin` mixed in (cached per class)."""
    if issubclass(trainer_class, SafeLoadingMixin):
        return trainer_class
    if trainer_class not in _WRAPPED:
        if not issubclass(trainer_class, Trainer):
            return trainer_class  # e.g. DecisionTreeTrainer: no torch checkpoints
        _WRAPPED[trainer_class] = type(
            f"MM{trainer_class.__name__}", (SafeLoadingMixin, trainer_class), {}
        )
    return _WRAPPED[trainer_class]
