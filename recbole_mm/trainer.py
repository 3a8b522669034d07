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
"""

import copy
import hashlib
import json
import os
import random
import time

import numpy as np
import torch
from recbole.evaluator import Collector
from recbole.trainer import Trainer
from recbole.utils import dict2str, early_stopping, set_color

from recbole_mm.compat import torch_load
from recbole_mm.atomic import atomic_path, torch_save_atomic
from recbole_mm.utils import dist_rank_world  # noqa: F401  (also this module's name, as before)

# Config keys that do not change what a run computes: left out of the run key, so a run
# resumes after a change of paths, logging, devices or launcher settings.
RUN_KEY_IGNORED = frozenset({
    "resume", "save_last_checkpoint", "checkpoint_dir", "state", "show_progress", "verbose",
    "local_rank", "device", "gpu_id", "use_gpu", "single_spec", "ip", "port", "nproc", "offset",
    "group_offset", "ddp_backend", "ddp_check_replicas", "record_runs", "record_path", "log_wandb",
    "wandb_project", "worker", "share_dir",
    # how, not what: the same values either way
    "feature_table_mmap", "activation_checkpointing", "eval_memory_mb", "ce_memory_mb", "contrastive_memory_mb",
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


def barrier():
    import torch.distributed as dist

    if dist_rank_world()[1] > 1:
        dist.barrier()


def all_gather_object(obj):
    import torch.distributed as dist

    if dist_rank_world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if dist_rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


class _NullWriter:
    """Stands in for tensorboard's SummaryWriter on ranks other than 0 (writes nothing)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _null_tensorboard(logger):
    return _NullWriter()


class GatheringCollector(Collector):
    """RecBole's ``Collector`` that, under DDP, gathers every rank's evaluation rows, and keeps the
    per-sample top-k rows (``rec.topk``) of the last evaluation in ``last_topk`` for the test
    slices (:mod:`recbole_mm.slices`).

    ``DistributedSampler(shuffle=False)`` gives rank ``r`` the samples ``r, r + W, r + 2W, ...``
    of the list padded to a multiple of ``W`` with its first samples. Interleaving the ranks'
    rows back and cutting at the true number of samples restores the single-process order
    without duplicates, so the metrics are computed once over exactly the rows a
    single-process evaluation sees. When the rows do not line up with the samples (a loader
    with several rows per sample), RecBole's per-rank average is kept, and ``last_topk`` is None
    (a rank's rows alone are not the evaluation's). In a single process it is RecBole's collector
    plus ``last_topk``.
    """

    ROW_KEYS = ("rec.items", "rec.topk", "rec.meanrank", "rec.score", "data.label")

    def __init__(self, config):
        super().__init__(config)
        self._expect = None
        self.gathered = False
        self.last_topk = None

    def expect(self, eval_data):
        sampler = getattr(eval_data, "sampler", None)
        shard = len(sampler) if isinstance(sampler, torch.utils.data.distributed.DistributedSampler) else None
        self._expect = (int(eval_data.sample_size), shard)

    def get_data_struct(self):
        import torch.distributed as dist

        self.gathered = False
        expect, self._expect = self._expect, None
        rank, world = dist_rank_world()
        if expect is not None and world > 1:
            n_total, shard = expect
            keys = [k for k in self.ROW_KEYS if k in self.data_struct]
            meta = (keys, {k: tuple(self.data_struct[k].shape) for k in keys}, shard)
            metas = all_gather_object(meta)
            ok = shard is not None and all(
                m[0] == keys and m[2] == shard and all(m[1][k] == meta[1][k] and m[1][k][0] == shard for k in keys)
                for m in metas
            )
            if ok:
                for k in keys:
                    t = self.data_struct[k].to(self.device).contiguous()
                    parts = [torch.empty_like(t) for _ in range(world)]
                    dist.all_gather(parts, t)
                    merged = torch.stack(parts, dim=1).reshape((-1,) + tuple(t.shape[1:]))[:n_total]
                    self.data_struct[k] = merged
                self.gathered = True
        struct = super().get_data_struct()
        complete = world == 1 or self.gathered
        self.last_topk = struct.get("rec.topk") if complete and "rec.topk" in struct else None
        return struct


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


class SafeLoadingMixin:
    """Checkpoint loading that works on torch >= 2.6, and a per-epoch history.

    A model may define ``optimizer_param_groups()`` (e.g. a smaller learning rate for an
    end-to-end content encoder); frozen parameters never reach the optimizer.
    """

    def __init__(self, config, model):
        distributed = not config["single_spec"]
        cpu_ddp = distributed and torch.device(config["device"]).type != "cuda"
        rank, _ = dist_rank_world()
        import recbole.trainer.trainer as recbole_trainer

        get_tensorboard = recbole_trainer.get_tensorboard
        if cpu_ddp:
            # RecBole builds DistributedDataParallel(model, device_ids=[local_rank]), which
            # torch refuses for a CPU module: build it below with device_ids=None instead.
            config["single_spec"] = True
        if distributed and rank != 0:
            recbole_trainer.get_tensorboard = _null_tensorboard  # rank 0 alone writes logs
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = not distributed
            recbole_trainer.get_tensorboard = get_tensorboard
        if cpu_ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.distributed_model = DistributedDataParallel(self.model, device_ids=None)
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

    @property
    def is_main_process(self):
        return dist_rank_world()[0] == 0

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

    def _map_reduce(self, result, num_sample):
        if getattr(self.eval_collector, "gathered", False):
            return result  # already computed over every rank's rows
        return super()._map_reduce(result, num_sample)

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

    def last_eval_topk(self):
        """RecBole's per-sample ``rec.topk`` rows of the last ``evaluate`` (all ranks' rows, in the
        evaluation set's order), or None (no top-k metric; DDP rows that could not be gathered)."""
        return getattr(self.eval_collector, "last_topk", None)

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

    # ------------------------------------------------------------------ resumable training
    def _recbole_fit_is_next(self):
        """True when the ``fit`` after this mixin in the MRO is RecBole's ``Trainer.fit``
        (trainers with their own ``fit``, e.g. pre-training, keep it and are not resumable)."""
        mro = type(self).__mro__
        for cls in mro[mro.index(SafeLoadingMixin) + 1:]:
            if "fit" in cls.__dict__:
                return cls is Trainer
        return False

    def last_checkpoint_file(self):
        return last_checkpoint_path(self.config)

    def _save_last_enabled(self):
        flag = self.config["save_last_checkpoint"] if "save_last_checkpoint" in self.config.final_config_dict else True
        return flag is None or bool(flag)

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

    def remove_last_checkpoint(self):
        """Delete this run's last checkpoint (after a successful run); rank 0 only."""
        if self.is_main_process:
            path = self.last_checkpoint_file()
            if os.path.isfile(path):
                os.remove(path)

    def replica_digests(self):
        """SHA-256 of every parameter and buffer, per rank (collective under DDP)."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode("utf-8"))
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return all_gather_object(h.hexdigest())

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's ``Trainer.fit``, plus the last checkpoint after every epoch and resume."""
        if not self._recbole_fit_is_next():
            if resume_mode(self.config) == "true":
                self.logger.warning(f"{type(self).__name__} has its own fit: resume is not supported, training afresh")
            return super().fit(train_data, valid_data, verbose=verbose, saved=saved,
                               show_progress=show_progress, callback_fn=callback_fn)
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
