"""Resume: the last checkpoint written after every epoch (model, optimizer, early-stopping
counters, history and the python/numpy/torch/CUDA and data-loader random states of every rank),
and restoring it per config ``resume: auto|true|false`` (:func:`resume_mode`), after checking that
it belongs to this run (its run key)."""

import copy
import os
import random

import numpy as np
import torch
from recbole.utils import set_color

from recbole_mm.atomic import torch_save_atomic
from recbole_mm.trainer.checkpoints import _LAST_WRITTEN, _RESUMED_IN_RUN, run_key
from recbole_mm.trainer.ddp import all_gather_object, barrier, broadcast_object
from recbole_mm.utils import dist_rank_world


def resume_mode(config):
    """``auto`` (resume when the last checkpoint exists), ``true`` (it must exist) or ``false``."""
    value = config["resume"] if "resume" in config.final_config_dict else "auto"
    if value is None:
        return "auto"
    text = str(value).strip().lower()
    if text in ("auto", ""):
        return "auto"
    if text in ("true", "1", "yes", "on"):
        return "true"
    if text in ("false", "0", "no", "off"):
        return "false"
    raise ValueError(f"resume must be auto, true or false, got {value!r}")


class ResumeMixin:
    """The last checkpoint with every rank's random states, and resuming from it."""

    def _rng_state(self, train_data):
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "train_data": None,
        }
        generator = getattr(train_data, "generator", None)
        if isinstance(generator, torch.Generator):
            state["train_data"] = generator.get_state()
        return state

    def _set_rng_state(self, state, train_data):
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        generator = getattr(train_data, "generator", None)
        if state.get("train_data") is not None and isinstance(generator, torch.Generator):
            generator.set_state(state["train_data"].cpu())

    def _save_last_checkpoint(self, path, epoch_idx, train_data, finished):
        """Everything ``fit`` needs to continue after ``epoch_idx``; atomic; rank 0 writes."""
        if path is None:
            return
        rng = all_gather_object(self._rng_state(train_data))  # one state per rank
        if self.is_main_process:
            state = {
                "format": "recbole_mm-last-1",
                "config": self.config,
                "run_key": run_key(self.config),
                "epoch": epoch_idx,
                "finished": bool(finished),
                "cur_step": self.cur_step,
                "best_valid_score": self.best_valid_score,
                "best_valid_result": self.best_valid_result,
                "best_checkpoint": self.saved_model_file,
                "state_dict": self.model.state_dict(),
                "other_parameter": self.model.other_parameter(),
                "optimizer": self.optimizer.state_dict(),
                "train_loss_dict": dict(self.train_loss_dict),
                "history": copy.deepcopy(self._history()),
                "world_size": dist_rank_world()[1],
                "rng": rng,
            }
            torch_save_atomic(state, path)
            _LAST_WRITTEN.add(os.path.abspath(path))
        barrier()

    def _maybe_resume(self, path, train_data):
        """Restore the state saved in ``path`` per ``resume``; returns True if that run had finished."""
        mode = resume_mode(self.config)
        if mode == "false":
            return False
        exists = broadcast_object(os.path.isfile(path))
        if not exists:
            if mode == "true" and not _RESUMED_IN_RUN[0]:
                raise FileNotFoundError(
                    f"resume: true, but this run has no last checkpoint {path} (checkpoints are "
                    "keyed by the config that defines the run: same model, dataset and settings, "
                    "same checkpoint_dir). Use resume: auto to start afresh when there is none."
                )
            return False
        ckpt = self._load_on_all_ranks(path)
        if ckpt.get("run_key") != run_key(self.config):
            raise ValueError(f"{path} belongs to another run (run key {ckpt.get('run_key')}, "
                             f"this run {run_key(self.config)})")
        self.model.load_state_dict(ckpt["state_dict"])
        self.model.load_other_parameter(ckpt.get("other_parameter"))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.cur_step = ckpt["cur_step"]
        self.best_valid_score = ckpt["best_valid_score"]
        self.best_valid_result = ckpt["best_valid_result"]
        self.train_loss_dict = dict(ckpt.get("train_loss_dict") or {})
        self.history = copy.deepcopy(ckpt.get("history")) or {"train_loss": [], "valid_score": [], "valid_result": []}
        rank, world = dist_rank_world()
        rng = ckpt["rng"]
        if len(rng) != world:
            self.logger.warning(f"{path} was written by {len(rng)} process(es), this run has {world}: "
                                "random states are taken from rank 0, so the run may not repeat exactly")
        self._set_rng_state(rng[rank] if rank < len(rng) else rng[0], train_data)
        # keep this trainer's best-checkpoint name (callers may have chosen it): move the
        # killed run's best checkpoint there
        old_best = ckpt.get("best_checkpoint")
        if self.is_main_process and old_best and old_best != self.saved_model_file and os.path.isfile(old_best):
            os.makedirs(os.path.dirname(os.path.abspath(self.saved_model_file)), exist_ok=True)
            os.replace(old_best, self.saved_model_file)
        barrier()
        _RESUMED_IN_RUN[0] = True
        self.resumed_from = {"checkpoint": os.path.abspath(path), "epoch": int(ckpt["epoch"]),
                             "finished": bool(ckpt.get("finished"))}
        self.history.setdefault("resumed", []).append(dict(self.resumed_from))
        self.logger.info(
            set_color("Resuming", "blue") + f" from {path}: epoch {ckpt['epoch']} done"
            + (" (training had finished)" if ckpt.get("finished") else f", continuing with epoch {self.start_epoch}")
        )
        return bool(ckpt.get("finished"))
