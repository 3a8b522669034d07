"""The fit loop: RecBole's ``Trainer.fit``, plus the last checkpoint after every epoch and resume."""

from recbole.trainer import Trainer
from recbole.utils import dict2str, early_stopping, set_color

from recbole_mm.trainer.resume import resume_mode


class FitLoopMixin:
    """RecBole's ``fit`` loop, resumable (see :mod:`recbole_mm.trainer.resume`)."""

    # ------------------------------------------------------------------ resumable training
    def _recbole_fit_is_next(self):
        """True when the ``fit`` after this mixin in the MRO is RecBole's ``Trainer.fit``
        (trainers with their own ``fit``, e.g. pre-training, keep it and are not resumable)."""
        mro = type(self).__mro__
        # this mixin holds SafeLoadingMixin's fit: look past it (was mro.index(SafeLoadingMixin))
        for cls in mro[mro.index(FitLoopMixin) + 1:]:
            if "fit" in cls.__dict__:
                return cls is Trainer
        return False

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's ``Trainer.fit``, plus the last checkpoint after every epoch and resume."""
        if not self._recbole_fit_is_next():
            if resume_mode(self.config) == "true":
                self.logger.warning(f"{type(self).__name__} has its own fit: resume is not supported, training afresh")
            return super().fit(train_data, valid_data, verbose=verbose, saved=saved,
                               show_progress=show_progress, callback_fn=callback_fn)
        # ---------------------------------------------------------------- copied from RecBole
        # From here to the end of fit: RecBole 1.2.1 recbole/trainer/trainer.py, Trainer.fit
        # (reformatted; RecBole's module-level ``from time import time`` is imported locally here).
        # Changed:
        # * added: ``last_file`` and ``finished`` (the last checkpoint and resume, next 4 lines);
        #   RecBole's ``if saved and self.start_epoch >= self.epochs`` gains ``and not finished``;
        # * the epoch range ends at ``self.start_epoch`` (no epoch) when the resumed run had finished;
        # * added: ``last_epoch``, ``stop_flag = False`` before the evaluation, and
        #   ``self._save_last_checkpoint(...)`` after every epoch (before ``continue`` on the path
        #   without validation);
        # * on early stopping RecBole breaks inside ``if stop_flag:`` (skipping ``valid_step += 1``);
        #   here ``valid_step += 1`` runs, the last checkpoint is written, then the loop breaks;
        # * added: the last checkpoint is removed after the loop unless ``keep_finished_last_checkpoint``.
        # RecBole's Trainer._train_epoch is not copied: history.py's _train_epoch wraps it (super()).
        # ------------------------------------------------------------------------------------------
        last_file = self.last_checkpoint_file() if (saved and self._save_last_enabled()) else None
        if last_file is None and resume_mode(self.config) == "true":
            raise ValueError("resume: true needs saved=True and save_last_checkpoint: True")
        finished = self._maybe_resume(last_file, train_data) if last_file else False
        if saved and self.start_epoch >= self.epochs and not finished:
            self._save_checkpoint(-1, verbose=verbose)

        self.eval_collector.data_collect(train_data)
        if self.config["train_neg_sample_args"].get("dynamic", False):
            train_data.get_model(self.model)
        valid_step = 0
        from time import time

        for epoch_idx in range(self.start_epoch, self.start_epoch if finished else self.epochs):
            # train
            training_start_time = time()
            train_loss = self._train_epoch(train_data, epoch_idx, show_progress=show_progress)
            self.train_loss_dict[epoch_idx] = sum(train_loss) if isinstance(train_loss, tuple) else train_loss
            training_end_time = time()
            train_loss_output = self._generate_train_loss_output(
                epoch_idx, training_start_time, training_end_time, train_loss
            )
            if verbose:
                self.logger.info(train_loss_output)
            self._add_train_loss_to_tensorboard(epoch_idx, train_loss)
            self.wandblogger.log_metrics(
                {"epoch": epoch_idx, "train_loss": train_loss, "train_step": epoch_idx}, head="train"
            )
            last_epoch = epoch_idx + 1 >= self.epochs

            # eval
            if self.eval_step <= 0 or not valid_data:
                if saved:
                    self._save_checkpoint(epoch_idx, verbose=verbose)
                self._save_last_checkpoint(last_file, epoch_idx, train_data, finished=last_epoch)
                continue
            stop_flag = False
            if (epoch_idx + 1) % self.eval_step == 0:
                valid_start_time = time()
                valid_score, valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
                self.best_valid_score, self.cur_step, stop_flag, update_flag = early_stopping(
                    valid_score, self.best_valid_score, self.cur_step,
                    max_step=self.stopping_step, bigger=self.valid_metric_bigger,
                )
                valid_end_time = time()
                valid_score_output = (
                    set_color("epoch %d evaluating", "green") + " [" + set_color("time", "blue")
                    + ": %.2fs, " + set_color("valid_score", "blue") + ": %f]"
                ) % (epoch_idx, valid_end_time - valid_start_time, valid_score)
                valid_result_output = set_color("valid result", "blue") + ": \n" + dict2str(valid_result)
                if verbose:
                    self.logger.info(valid_score_output)
                    self.logger.info(valid_result_output)
                self.tensorboard.add_scalar("Vaild_score", valid_score, epoch_idx)
                self.wandblogger.log_metrics({**valid_result, "valid_step": valid_step}, head="valid")

                if update_flag:
                    if saved:
                        self._save_checkpoint(epoch_idx, verbose=verbose)
                    self.best_valid_result = valid_result

                if callback_fn:
                    callback_fn(epoch_idx, valid_score)

                if stop_flag:
                    stop_output = "Finished training, best eval result in epoch %d" % (
                        epoch_idx - self.cur_step * self.eval_step
                    )
                    if verbose:
                        self.logger.info(stop_output)
                valid_step += 1
            self._save_last_checkpoint(last_file, epoch_idx, train_data, finished=stop_flag or last_epoch)
            if stop_flag:
                break

        self._add_hparam_to_tensorboard(self.best_valid_score)
        if last_file is not None and not self.keep_finished_last_checkpoint:
            self.remove_last_checkpoint()
        return self.best_valid_score, self.best_valid_result
        # ------------------------------------------------------------ end of the copy from RecBole
