"""Checkpoints: saving and loading them, on torch >= 2.6 and under DDP.

RecBole loads its checkpoints with ``torch.load`` and torch's default ``weights_only=True``
(recbole/trainer/trainer.py:323, :583; RecBole #2212): :class:`CheckpointMixin` loads them through
:func:`recbole_mm.compat.torch_load` (``weights_only=False``), writes the best checkpoint atomically
on global rank 0 while every rank waits, and names the "last" checkpoint of a run
(``<checkpoint_dir>/<model>-<dataset>-<run key>-last.pth``, :func:`last_checkpoint_path`; the run key
hashes the config that defines the run, :func:`run_key`, not the keys in :data:`RUN_KEY_IGNORED`).

The process-global records of the last checkpoints written since the runner started its run
(:func:`forget_last_checkpoints`, :func:`remove_last_checkpoints`) live here too.
"""

import hashlib
import json
import os

import torch
from recbole.utils import set_color

from recbole_mm.compat import torch_load
from recbole_mm.atomic import atomic_path
from recbole_mm.trainer.ddp import GatheringCollector, all_gather_object, barrier, broadcast_object
from recbole_mm.utils import dist_rank_world

# Config keys that do not change what a run computes: left out of the run key, so a run
# resumes after a change of paths, logging, devices or launcher settings.
RUN_KEY_IGNORED = frozenset({
    "resume", "save_last_checkpoint", "checkpoint_dir", "state", "show_progress", "verbose",
    "local_rank", "device", "gpu_id", "use_gpu", "single_spec", "ip", "port", "nproc", "offset",
    "group_offset", "ddp_backend", "ddp_check_replicas", "record_runs", "record_path", "log_wandb",
    "wandb_project", "worker", "share_dir",
    # how, not what: the same values either way
    "feature_table_mmap", "activation_checkpointing", "eval_memory_mb", "ce_memory_mb", "contrastive_memory_mb",
    "image_pixel_cache_mb",
})


# Last checkpoints written in this process since the runner started its run (nested
# trainers too, e.g. SICSRec's step 1): the runner deletes them all once the run succeeded.
_LAST_WRITTEN = set()
# Whether a trainer of the current run resumed (a multi-step run such as SICSRec killed in
# step 1 has no step-2 checkpoint yet: resume: true is then satisfied by step 1).
_RESUMED_IN_RUN = [False]


def forget_last_checkpoints():
    _LAST_WRITTEN.clear()
    _RESUMED_IN_RUN[0] = False


def remove_last_checkpoints():
    """Delete every last checkpoint this process wrote since :func:`forget_last_checkpoints`."""
    for path in sorted(_LAST_WRITTEN):
        if os.path.isfile(path):
            os.remove(path)
    _LAST_WRITTEN.clear()


def _canonical(value):
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def run_key(config):
    """12-hex digest of the config that defines a run (see :data:`RUN_KEY_IGNORED`)."""
    cfg = config.final_config_dict
    payload = {k: _canonical(v) for k, v in cfg.items() if k not in RUN_KEY_IGNORED}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def last_checkpoint_path(config):
    """``<checkpoint_dir>/<model>-<dataset>-<run key>-last.pth``: the same for every rank and rerun."""
    return os.path.join(
        config["checkpoint_dir"], f"{config['model']}-{config['dataset']}-{run_key(config)}-last.pth"
    )


class CheckpointMixin:
    """Checkpoint saving and loading that works on torch >= 2.6 and under DDP; the last
    checkpoint's path."""

    def _load_on_all_ranks(self, path):
        """``torch_load(path)`` on every rank (collective under DDP). A rank that cannot see
        the file (multi-node without a shared ``checkpoint_dir``) receives rank 0's copy."""
        if dist_rank_world()[1] == 1:
            return torch_load(path, map_location=self.device)
        seen = all_gather_object(os.path.isfile(path))
        if all(seen):
            return torch_load(path, map_location=self.device)
        if not seen[0]:
            raise FileNotFoundError(f"checkpoint {path} not found on rank 0")
        return broadcast_object(torch_load(path, map_location="cpu") if self.is_main_process else None)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """RecBole's best checkpoint, written atomically by global rank 0; all ranks wait for it."""
        target = kwargs.pop("saved_model_file", self.saved_model_file)
        if self.is_main_process:
            with atomic_path(target) as tmp:  # global rank 0 is local rank 0: RecBole's rank check lets it write
                super()._save_checkpoint(epoch, verbose=False, saved_model_file=tmp, **kwargs)
            if verbose:
                self.logger.info(set_color("Saving current", "blue") + f": {target}")
        barrier()

    def load_checkpoint_weights(self, checkpoint_file, checkpoint=None):
        if checkpoint is None:
            checkpoint = torch_load(checkpoint_file, map_location=self.device)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.loaded_checkpoint = checkpoint_file
        self.logger.info(
            set_color("Loading model structure and parameters from", "blue") + f": {checkpoint_file}"
        )
        return checkpoint

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return
        if load_best_model:
            path = model_file or self.saved_model_file
            self.load_checkpoint_weights(path, self._load_on_all_ranks(path))
        if isinstance(self.eval_collector, GatheringCollector):
            self.eval_collector.expect(eval_data)
        return super().evaluate(
            eval_data, load_best_model=False, model_file=None, show_progress=show_progress
        )

    def resume_checkpoint(self, resume_file):
        # Copied from RecBole 1.2.1 recbole/trainer/trainer.py, Trainer.resume_checkpoint (its
        # docstring and comments left out). Changed: ``torch_load`` (weights_only=False) instead of
        # ``torch.load``, and the warning names the checkpoint's model and this run's.
        resume_file = str(resume_file)
        self.saved_model_file = resume_file
        checkpoint = torch_load(resume_file, map_location=self.device)
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        if checkpoint["config"]["model"].lower() != self.config["model"].lower():
            self.logger.warning(
                f"Checkpoint {resume_file} was written by model {checkpoint['config']['model']}, "
                f"not {self.config['model']}: loading its state_dict may fail."
            )
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    def last_checkpoint_file(self):
        return last_checkpoint_path(self.config)

    def _save_last_enabled(self):
        flag = self.config["save_last_checkpoint"] if "save_last_checkpoint" in self.config.final_config_dict else True
        return flag is None or bool(flag)

    def remove_last_checkpoint(self):
        """Delete this run's last checkpoint (after a successful run); rank 0 only."""
        if self.is_main_process:
            path = self.last_checkpoint_file()
            if os.path.isfile(path):
                os.remove(path)
