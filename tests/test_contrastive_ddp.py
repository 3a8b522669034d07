"""Contrastive losses under DDP (2 gloo ranks on CPU): each rank computes its own rows against the
gathered columns (recbole_mm.model.layers.gather_rows), and the gradients DDP averages equal those
of the whole batch's loss computed in one process: TSSR's L_u and L_i, SICSRec's CACL."""

import functools
import os
import socket
import types

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from recbole_mm.model.sicsrec import SICSRec
from recbole_mm.model.tssr import TSSR

B, L, D, N_ITEMS = 7, 4, 8, 9
SPLIT = 3  # rank 0 holds rows 0-2, rank 1 rows 3-6 (unequal shards)


def _inputs():
    g = torch.Generator().manual_seed(0)
    h_id = torch.randn(B, L, D, generator=g)
    h_c = torch.randn(B, L, D, generator=g)
    s = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    labels = torch.randint(1, N_ITEMS, (B, L), generator=g)
    labels[0, 3] = labels[4, 2] = 0  # padding positions
    labels[5, 1] = labels[1, 1]  # a duplicate next item at one position
    item_seq = torch.where(labels > 0, labels, torch.zeros_like(labels))
    users = torch.tensor([1, 2, 2, 3, 4, 4, 5])  # several windows of one user
    target = torch.tensor([3, 5, 3, 7, 1, 2, 5])  # duplicate targets across the shards
    return h_id, h_c, s, labels, item_seq, users, target


def _fake(negatives):
    """The attributes TSSR's and SICSRec's loss methods read, without a dataset."""
    torch.manual_seed(1)
    m = types.SimpleNamespace(
        lu_pooling="masked", tau_u=0.5, li_similarity="dot", tau_i=0.7, li_mask_duplicates=True,
        contrastive_memory_mb=None, contrast_negatives=negatives, tau=0.3, cacl_duplicate_mask="neg_inf",
        item_embedding=nn.Embedding(N_ITEMS, D), content_table=nn.Embedding(N_ITEMS, D))
    m.item_content = m.content_table
    m._global = functools.partial(TSSR._global, m)
    m._item_direction = functools.partial(TSSR._item_direction, m)
    m._item_direction_sum = functools.partial(TSSR._item_direction_sum, m)
    return m


def _losses(m, h_id, h_c, s, labels, item_seq, users, target):
    return (TSSR._user_loss(m, h_id, h_c, item_seq, users), TSSR._item_loss(m, h_id, h_c, labels),
            SICSRec.cacl_loss(m, s, target))


def _grads(m, acts, losses, k):
    """Gradients of loss ``k`` w.r.t. the activations and the two item tables."""
    params = [m.item_embedding.weight, m.content_table.weight]
    grads = torch.autograd.grad(losses[k], list(acts) + params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, list(acts) + params)]


def _worker(rank, world, port, reference, errors):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        h_id, h_c, s, labels, item_seq, users, target = _inputs()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, B)
        acts = [t[rows].clone().requires_grad_() for t in (h_id, h_c, s)]
        m = _fake("global")
        losses = _losses(m, acts[0], acts[1], acts[2], labels[rows], item_seq[rows], users[rows], target[rows])
        for k in range(3):
            got = _grads(m, acts, losses, k)
            ref_loss, ref = reference[k]
            value = losses[k].detach().clone()
            dist.all_reduce(value)
            assert torch.allclose(value / world, ref_loss, atol=1e-5), (k, value / world, ref_loss)
            # activations: DDP averages, so each rank's own rows carry world x the whole-batch gradient
            for g, r in zip(got[:3], ref[:3]):
                assert torch.allclose(g / world, r[rows], atol=1e-5), (k, g / world, r[rows])
            # parameters used directly by the columns: the rank average equals the whole-batch gradient
            for g, r in zip(got[3:], ref[3:]):
                g = g.clone()
                dist.all_reduce(g)
                assert torch.allclose(g / world, r, atol=1e-5), (k, g / world, r)
    except AssertionError as e:  # reported by the parent
        errors.put(f"rank {rank}: {e}")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rows_against_gathered_columns_give_the_whole_batch_gradients():
    import torch.distributed as dist

    assert not dist.is_initialized()
    h_id, h_c, s, labels, item_seq, users, target = _inputs()
    acts = [t.clone().requires_grad_() for t in (h_id, h_c, s)]
    m = _fake("local")  # one process, the whole batch: the reference
    losses = _losses(m, acts[0], acts[1], acts[2], labels, item_seq, users, target)
    assert all(torch.isfinite(x) and x > 0 for x in losses)
    reference = [(losses[k].detach(), [g.detach() for g in _grads(m, acts, losses, k)]) for k in range(3)]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    mp.start_processes(_worker, args=(2, _free_port(), reference, errors), nprocs=2, join=True,
                       start_method="spawn")
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, problems


@pytest.mark.parametrize("negatives", ["global", "local"])
def test_without_ddp_global_and_local_negatives_agree(negatives):
    """Outside DDP there is nothing to gather: both settings are the whole-batch loss."""
    h_id, h_c, s, labels, item_seq, users, target = _inputs()
    ref = _losses(_fake("local"), h_id, h_c, s, labels, item_seq, users, target)
    got = _losses(_fake(negatives), h_id, h_c, s, labels, item_seq, users, target)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b)
