"""The per-epoch history of training losses and validation scores (for run records and plots),
and the formatting of metrics and named loss terms for log lines."""

import time

from recbole.utils import set_color


def format_metrics(metrics, places=4):
    """``hit@5: 0.1000  ndcg@5: 0.0712`` for a log line (not ``OrderedDict([('hit@5', np.float64(..))])``)."""
    if not isinstance(metrics, dict):
        return str(metrics)
    return "  ".join(f"{k}: {float(v):.{places}f}" for k, v in metrics.items())


def format_named_losses(losses, names, places=4):
    """``train_loss: <total> | ce: x, user_cl: y`` (colored as RecBole's epoch line)."""
    fmt = "%." + str(places) + "f"
    terms = ", ".join(set_color(str(name), "blue") + ": " + fmt % float(loss) for name, loss in zip(names, losses))
    return set_color("train_loss", "blue") + ": " + fmt % sum(float(x) for x in losses) + " | " + terms


class HistoryMixin:
    """A per-epoch history (``self.history``): training losses, validation scores and results,
    seconds per training and validation pass; RecBole's epoch line with the loss terms named."""

    def _history(self):
        if not hasattr(self, "history"):
            self.history = {"train_loss": [], "valid_score": [], "valid_result": []}
        return self.history

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        if isinstance(loss, tuple):
            value = [float(x) for x in loss]
        else:
            value = float(loss)
        self._history()["train_loss"].append(value)
        # seconds of each training pass (no evaluation), for "s / training epoch" in study reports
        self._history().setdefault("train_epoch_s", []).append(round(time.perf_counter() - start, 3))
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time.perf_counter()
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self._history().setdefault("valid_epoch_s", []).append(round(time.perf_counter() - start, 3))
        self._history()["valid_score"].append(float(score))
        self._history()["valid_result"].append({k: float(v) for k, v in result.items()})
        return score, result

    def _generate_train_loss_output(self, epoch_idx, s_time, e_time, losses):
        """RecBole's epoch line, with the loss terms named when the model says what they are.

        A model whose ``calculate_loss`` returns a tuple may define ``loss_names`` (a tuple of
        the same length, e.g. ``("ce", "user_cl", "item_cl")``): the line then reads
        ``train_loss: <total> | ce: x, user_cl: y, item_cl: z``. Without names (or with names
        that do not match the tuple) it is RecBole's ``train_loss1: x, train_loss2: y``.
        """
        names = getattr(self.model, "loss_names", None)
        if not isinstance(losses, tuple) or not names or len(names) != len(losses):
            return super()._generate_train_loss_output(epoch_idx, s_time, e_time, losses)
        places = self.config["loss_decimal_place"] or 4
        return (
            (set_color("epoch %d training", "green") + " [" + set_color("time", "blue") + ": %.2fs, ")
            % (epoch_idx, e_time - s_time)
            + format_named_losses(losses, names, places)
            + "]"
        )
