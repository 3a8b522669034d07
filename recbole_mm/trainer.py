"""Trainers: RecBole's, plus what RecBole lacks.

``MMTrainer`` (and every RecBole trainer reached through ``registry.get_trainer``) loads
checkpoints with ``weights_only=False`` so the best-checkpoint reload works on torch >= 2.6
(recbole/trainer/trainer.py:323, :583; RecBole #2212), and keeps a per-epoch history of
training losses and validation scores for run records and plots.
"""

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_mm.compat import torch_load


class SafeLoadingMixin:
    """Checkpoint loading that works on torch >= 2.6, and a per-epoch history.

    A model may define ``optimizer_param_groups()`` (e.g. a smaller learning rate for an
    end-to-end content encoder); frozen parameters never reach the optimizer.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        if hasattr(model, "optimizer_param_groups"):
            self.optimizer = self._build_optimizer(params=model.optimizer_param_groups())
        else:
            self.optimizer = self._build_optimizer(
                params=[p for p in model.parameters() if p.requires_grad]
            )

    def _history(self):
        if not hasattr(self, "history"):
            self.history = {"train_loss": [], "valid_score": [], "valid_result": []}
        return self.history

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        if isinstance(loss, tuple):
            value = [float(x) for x in loss]
        else:
            value = float(loss)
        self._history()["train_loss"].append(value)
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self._history()["valid_score"].append(float(score))
        self._history()["valid_result"].append({k: float(v) for k, v in result.items()})
        return score, result

    def load_checkpoint_weights(self, checkpoint_file):
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
            self.load_checkpoint_weights(model_file or self.saved_model_file)
        return super().evaluate(
            eval_data, load_best_model=False, model_file=None, show_progress=show_progress
        )

    def resume_checkpoint(self, resume_file):
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
