"""SICSRec's ``sparse_table_updates``: sparse gradients and SparseAdam (lazy Adam) for the trainable
stage-1 tables (and E under ``softmax: sampled``), a step updating only the rows its batch read."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from recbole_mm.model.sicsrec import SICSRec  # noqa: E402
from recbole_mm.optim import SparseDenseOptimizer  # noqa: E402
from recbole_mm.registry import get_trainer  # noqa: E402

from conftest import build_tiny, instantiate  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    config, dataset, loaders = build_tiny(root, "SICSRec", stage1=False, hidden_dropout_prob=0.0,
                                          attn_dropout_prob=0.0, item_dropout_prob=0.0, n_layers=1)
    return config, next(iter(loaders[0])), loaders


def _step(built, **overrides):
    """A model and its trainer after one optimiser step on the first training batch."""
    config, batch, (train, _, _) = built
    model = instantiate(config, train, SICSRec, **overrides)
    saved = {key: config[key] for key in overrides}
    for key, value in overrides.items():
        config[key] = value
    try:
        trainer = get_trainer(config["MODEL_TYPE"], "SICSRec")(config, model)
    finally:
        for key, value in saved.items():
            config[key] = value
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    trainer.optimizer.zero_grad()
    sum(model.calculate_loss(batch)).backward()
    trainer.optimizer.step()
    return model, trainer, batch, before


def _read_rows(model, batch):
    return torch.unique(torch.cat([batch[model.ITEM_SEQ].reshape(-1), batch[model.POS_ITEM_ID]]))


def test_a_step_updates_only_the_rows_the_batch_read(built):
    model, trainer, batch, before = _step(built, sparse_table_updates=True, softmax="sampled")
    assert isinstance(trainer.optimizer, SparseDenseOptimizer)
    sparse = {id(p) for p in trainer.optimizer.sparse.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in sparse}
    assert names == {"content_tables.text.weight", "item_embedding.weight"}
    read = torch.zeros(model.n_items, dtype=torch.bool)
    read[_read_rows(model, batch)] = True
    read[0] = False  # PAD: no gradient
    for name in names:
        now = dict(model.named_parameters())[name].detach()
        changed = (now != before[name]).any(1)
        assert changed[read].all() and not changed[~read].any(), name
    # the dense update (the default) moves every row: the regulariser's gradient covers the whole table
    model, trainer, _, before = _step(built, softmax="sampled")
    assert not isinstance(trainer.optimizer, SparseDenseOptimizer)
    now = model.content_tables["text"].weight.detach()
    assert (now != before["content_tables.text.weight"]).any(1)[1:].all()


def test_first_step_matches_dense_adam_without_the_regulariser(built):
    """Adam's first step moves a row with a zero gradient by 0, so without reg_weight the lazy and the
    dense update touch the same rows on step one (later steps differ: dense Adam keeps moving rows by
    momentum). On those rows SparseAdam's step is Adam's but for where eps enters (added to sqrt(v)
    before, not after, bias correction: a larger effective eps), so it is never longer and has the
    same sign; every other parameter gets the same dense Adam step."""
    sparse, _, _, before = _step(built, sparse_table_updates=True, reg_weight=0.0)
    dense, _, _, _ = _step(built, reg_weight=0.0)
    assert not sparse.item_embedding.sparse  # full softmax: E is read whole, so it stays dense
    name = "content_tables.text.weight"
    for (n, a), b in zip(sparse.named_parameters(), dense.parameters()):
        if n != name:
            assert torch.allclose(a, b, atol=1e-7), n
    step_sparse = sparse.content_tables["text"].weight.detach() - before[name]
    step_dense = dense.content_tables["text"].weight.detach() - before[name]
    assert torch.equal(step_sparse.ne(0).any(1), step_dense.ne(0).any(1))
    moved = step_dense != 0
    assert (torch.sign(step_sparse[moved]) == torch.sign(step_dense[moved])).all()
    assert (step_sparse.abs() <= step_dense.abs() + 1e-9).all()
    big = step_dense.abs() > 0.999 * 1e-3  # gradients far above eps: the same step
    assert big.sum() > 0 and torch.allclose(step_sparse[big], step_dense[big], rtol=0.05)


def test_regulariser_covers_the_read_rows(built):
    config, _, (train, _, _) = built
    model = instantiate(config, train, SICSRec, sparse_table_updates=True)
    rows = torch.tensor([0, 3, 5])
    expect = torch.linalg.vector_norm(model.content_tables["text"].weight[rows]) + \
        torch.linalg.vector_norm(model.item_embedding.weight)  # E dense under the full softmax
    assert torch.allclose(model.reg_loss(rows), expect)


def test_optimizer_state_round_trip_and_clear_errors(built):
    _, trainer, _, _ = _step(built, sparse_table_updates=True, softmax="sampled")
    state = trainer.optimizer.state_dict()
    _, other, _, _ = _step(built, sparse_table_updates=True, softmax="sampled")
    other.optimizer.load_state_dict(state)
    assert other.optimizer.state_dict()["sparse"]["state"].keys() == state["sparse"]["state"].keys()
    _, dense, _, _ = _step(built)
    with pytest.raises(ValueError, match="sparse_table_updates"):
        other.optimizer.load_state_dict(dense.optimizer.state_dict())
    with pytest.raises(ValueError, match="learner: adam"):
        _step(built, sparse_table_updates=True, learner="sgd")
    with pytest.raises(ValueError, match="weight_decay"):
        _step(built, sparse_table_updates=True, weight_decay=0.1)
    # what sparse gradients cannot go through: RecBole's gradient clipping, RecBole's DDP step
    config, _, (train, _, _) = built
    with pytest.raises(ValueError, match="clip_grad_norm"):
        instantiate(config, train, SICSRec, sparse_table_updates=True, clip_grad_norm={"max_norm": 1.0})
    with pytest.raises(ValueError, match="single-process only"):
        instantiate(config, train, SICSRec, sparse_table_updates=True, single_spec=False)
