"""DDP: the patches that let RecBole's trainer run under ``torch.distributed`` (CPU included).

* RecBole builds ``DistributedDataParallel(model, device_ids=[local_rank])``, which torch refuses
  for a CPU module: :class:`DDPMixin` builds it with ``device_ids=None`` instead;
* global rank 0 alone writes tensorboard files (:func:`_null_tensorboard` on the other ranks);
* evaluation gathers every rank's rows (:class:`GatheringCollector`), so distributed metrics equal
  single-process metrics instead of RecBole's average of per-rank averages;
* collective helpers (:func:`barrier`, :func:`all_gather_object`, :func:`broadcast_object`) that are
  no-ops in a single process, and the per-rank digests of the replicas (``replica_digests``).
"""

import hashlib

import torch
from recbole.evaluator import Collector

from recbole_mm.utils import dist_rank_world


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


class DDPMixin:
    """RecBole's trainer under DDP: CPU DDP construction, tensorboard on rank 0 only, gathered
    evaluation rows and the replicas' digests."""

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

    @property
    def is_main_process(self):
        return dist_rank_world()[0] == 0

    def _map_reduce(self, result, num_sample):
        if getattr(self.eval_collector, "gathered", False):
            return result  # already computed over every rank's rows
        return super()._map_reduce(result, num_sample)

    def last_eval_topk(self):
        """RecBole's per-sample ``rec.topk`` rows of the last ``evaluate`` (all ranks' rows, in the
        evaluation set's order), or None (no top-k metric; DDP rows that could not be gathered)."""
        return getattr(self.eval_collector, "last_topk", None)

    def replica_digests(self):
        """SHA-256 of every parameter and buffer, per rank (collective under DDP)."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode("utf-8"))
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return all_gather_object(h.hexdigest())
