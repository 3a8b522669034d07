"""SICSRec's trainer: step 1 (the ID SASRec: trained, or reused when its checkpoint exists) then step 2.

Step 1's configuration, checkpoint name and sharing live in :mod:`recbole_mm.model.sicsrec.id_pretraining`;
step 2 is RecBole's training loop over :class:`~recbole_mm.model.sicsrec.model.SICSRec`. The trainer hooks
of the model protocol report step 1 next to step 2 (``extra_test_results``, ``stage_summaries``).
"""

import os

import torch
from recbole.utils import init_seed, set_color

from recbole_mm.atomic import torch_save_atomic
from recbole_mm.compat import torch_load
from recbole_mm.model.sicsrec.id_pretraining import (
    _barrier,
    _history_of,
    _step1_share_dir,
    step1_config,
    step1_key,
    step1_path,
)
from recbole_mm.trainer import MMTrainer, format_metrics
from recbole_mm.utils import jsonable


class SICSRecTrainer(MMTrainer):
    """Runs SICSRec's two steps: step 1 (ID SASRec; trained, or reused when its checkpoint
    exists) then step 2 (the SICSRec model, RecBole's training loop with early stopping)."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        state, info = self.prepare_step1(train_data, valid_data, verbose=verbose, show_progress=show_progress)
        self.model.load_id_encoder(state)
        # only the weights are kept for evaluate_step1 (not the checkpoint's optimizer state)
        self._step1_state = state["state_dict"] if isinstance(state.get("state_dict"), dict) else state
        self.step1_info = info
        self._history()["step1"] = jsonable(info)
        # step 2 starts from the same random state whether step 1 was trained or reused
        init_seed(self.config["seed"] + self.config["local_rank"], self.config["reproducibility"])
        self.logger.info(set_color("SICSRec step 2", "green") + ": frozen ID Transformer + adapters, content "
                         "encoder, decoder and fusion")
        return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                           callback_fn=callback_fn)

    @torch.no_grad()
    def evaluate_step1(self, eval_data, show_progress=False):
        """Test metrics of the step-1 SASRec on ``eval_data``: the ID-only baseline this run's
        step 2 started from, scored by the same evaluator (a paired SASRec number for free).
        Stored in the run record as ``history.step1.test_result``; None before ``fit``."""
        from recbole.model.sequential_recommender.sasrec import SASRec

        from recbole_mm.registry import get_trainer

        state = getattr(self, "_step1_state", None)
        if state is None:
            return None
        cfg = step1_config(self.config)
        model = SASRec(cfg, eval_data._dataset).to(self.device)
        model.load_state_dict(state)
        trainer = get_trainer(cfg["MODEL_TYPE"], "SASRec")(cfg, model)
        result = trainer.evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        self._history().setdefault("step1", {})["test_result"] = jsonable(result)
        self.logger.info(set_color("SICSRec step 1 (ID SASRec) test result", "yellow") + ": "
                         + format_metrics(result, self.config["metric_decimal_place"] or 4))
        return result

    def extra_test_results(self, test_data, show_progress=False):
        """The step-1 SASRec's test metrics (:meth:`evaluate_step1`), as ``{"step1": ...}``."""
        result = self.evaluate_step1(test_data, show_progress=show_progress)
        return {} if result is None else {"step1": result}

    def stage_summaries(self):
        info = self._history().get("step1")
        if not isinstance(info, dict):
            return []
        trained = info.get("history") if isinstance(info.get("history"), dict) else None
        return [{
            "name": "step1", "label": "step-1 SASRec", "model": "SASRec",
            "epochs": len(trained.get("train_loss") or []) if trained else None,
            "max_epochs": step1_config(self.config)["epochs"], "reused": bool(info.get("reused")),
            "description": "Each run's step-1 ID SASRec (same size and split; trained in that run, or the study's "
                           "SASRec cell of the same seed when it was the same run and was loaded instead) tested by "
                           "the same evaluator: a paired ID-only baseline per seed.",
            "test_result": info.get("test_result"),
        }]

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        model = self.model
        if hasattr(model, "content_spread"):
            was = model.training
            model.eval()
            spread = model.content_spread()
            model.train(was)
            self._history().setdefault("content_mean_cosine", []).append(spread)
            self.logger.info(f"SICSRec epoch {epoch_idx}: content vectors' mean pairwise cosine {spread:.3f} "
                             "(1 = collapsed)")
        return loss

    def prepare_step1(self, train_data, valid_data=None, verbose=True, show_progress=False):
        """(step-1 state_dict, info): loaded from ``pretrained_id_encoder`` or the deterministic
        checkpoint, else trained now and saved there atomically."""
        config = self.config
        given = config["pretrained_id_encoder"]
        if given:
            if not os.path.isfile(given):
                raise FileNotFoundError(f"pretrained_id_encoder {given} does not exist (leave it empty to train "
                                        "step 1 and save it under checkpoint_dir)")
            ckpt = torch_load(given, map_location=self.device)
            self.logger.info(set_color("SICSRec step 1", "green") + f": loaded from pretrained_id_encoder {given}")
            return ckpt, {"checkpoint": os.path.abspath(given), "reused": True, "source": "pretrained_id_encoder"}
        key = step1_key(config, train_data, valid_data)
        path = step1_path(config, key)
        share = _step1_share_dir(config)
        candidates = [(path, None)] + ([(step1_path(config, key, share), "shared")] if share else [])
        if config["step1_retrain"]:
            candidates = []
        for candidate, source in candidates:
            if not os.path.isfile(candidate):
                continue
            ckpt = torch_load(candidate, map_location=self.device)
            meta = ckpt.get("sicsrec_step1", {})
            if meta.get("key") != jsonable(key):
                self.logger.warning(f"SICSRec step 1: {candidate} was written for other settings; not used")
                continue
            what = f"the step 1 published by a {meta['published_by']}" if meta.get("published_by") else "step 1"
            self.logger.info(set_color("SICSRec step 1", "green") + f": reusing {what}, {candidate} (best valid "
                             f"{meta.get('best_valid_score')})")
            info = {"checkpoint": candidate, "reused": True, "best_valid_score": meta.get("best_valid_score"),
                    "best_valid_result": meta.get("best_valid_result")}
            if meta.get("history"):
                info["history"] = meta["history"]  # the epochs it was trained for, when it was trained
            if source:
                info["source"] = f"share_dir ({meta.get('published_by', 'a SICSRec run')})"
            return ckpt, info
        return self.train_step1(train_data, valid_data, key, path, verbose, show_progress)

    def train_step1(self, train_data, valid_data, key, path, verbose=True, show_progress=False):
        from recbole.model.sequential_recommender.sasrec import SASRec

        from recbole_mm.registry import get_trainer

        cfg = step1_config(self.config)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        generator_state = train_data.generator.get_state()
        batch_changed = cfg["train_batch_size"] != self.config["train_batch_size"]
        if batch_changed:
            train_data.update_config(cfg)
        self.logger.info(set_color("SICSRec step 1", "green") + f": training an ID SASRec -> {path}")
        init_seed(cfg["seed"] + cfg["local_rank"], cfg["reproducibility"])
        model = SASRec(cfg, train_data._dataset).to(self.device)
        trainer = get_trainer(cfg["MODEL_TYPE"], "SASRec")(cfg, model)
        # under DDP only local rank 0 writes checkpoints (RecBole's rule): one shared partial name
        ddp = not cfg["single_spec"]
        writer = not ddp or cfg["local_rank"] == 0
        partial = f"{path}.partial-ddp" if ddp else f"{path}.partial-{os.getpid()}"
        trainer.saved_model_file = partial
        try:
            best_score, best_result = trainer.fit(train_data, valid_data, verbose=verbose, saved=True,
                                                  show_progress=show_progress)
            _barrier(ddp)
            if writer:
                ckpt = torch_load(partial, map_location=self.device)
                ckpt["sicsrec_step1"] = {"key": jsonable(key), "best_valid_score": jsonable(best_score),
                                         "best_valid_result": jsonable(best_result),
                                         "history": _history_of(trainer)}
                torch_save_atomic(ckpt, path)
            _barrier(ddp)
            ckpt = torch_load(path, map_location=self.device)
        finally:
            if writer and os.path.exists(partial):
                os.remove(partial)
            if batch_changed:
                train_data.update_config(self.config)
            train_data.generator.set_state(generator_state)
        self.logger.info(set_color("SICSRec step 1", "green") + f": best valid {best_result} saved to {path}")
        info = {"checkpoint": path, "reused": False, "best_valid_score": best_score,
                "best_valid_result": best_result, "history": getattr(trainer, "history", None)}
        return ckpt, info
