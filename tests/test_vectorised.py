"""recbole_mm.data.vectorised: RecBole's loading and splitting, same results without per-row Python."""

import os

import numpy as np
import pandas as pd
import pytest
import recbole
from recbole.data.dataset import Dataset

from recbole_mm.data.vectorised import _CParserPandas, group_order, leave_one_out_index

ML100K = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")


def _recbole_groups(keys):
    return [list(g) for g in Dataset._grouped_index(None, keys)]


@pytest.mark.parametrize("seed", [0, 1])
def test_groups_and_leave_one_out_match_recbole(seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 40, size=300)
    keys[:3] = [99, 98, 99]  # groups of size 1 and 2 as well, first appearance not sorted
    order, counts = group_order(keys)
    ours = np.split(order, np.cumsum(counts)[:-1])
    ref = _recbole_groups(keys)
    assert [g.tolist() for g in ours] == ref
    for n in (1, 2, 3):
        expected = Dataset._split_index_by_leave_one_out(None, ref, n)
        assert [p.tolist() for p in leave_one_out_index(order, counts, n)] == expected


@pytest.mark.parametrize("name,dtypes", [
    ("ml-100k.inter", {"user_id:token": str, "item_id:token": str, "rating:float": np.float64,
                       "timestamp:float": np.float64}),
    ("ml-100k.item", {"item_id:token": str, "movie_title:token_seq": str, "release_year:token": str,
                      "class:token_seq": str}),
])
def test_c_parser_reads_what_the_python_parser_reads(name, dtypes):
    path = os.path.join(ML100K, name)
    kw = dict(delimiter="\t", usecols=list(dtypes), dtype=dtypes, encoding="utf-8", engine="python")
    pd.testing.assert_frame_equal(_CParserPandas.read_csv(path, **kw), pd.read_csv(path, **kw))


def test_c_parser_quotes_and_empty_fields(tmp_path):
    path = tmp_path / "x.item"
    path.write_text('item_id:token\ttitle:token_seq\n1\t"a ""quoted"" title"\n2\t\n3\tplain, text\n')
    kw = dict(delimiter="\t", usecols=["item_id:token", "title:token_seq"], dtype=str, encoding="utf-8",
              engine="python")
    pd.testing.assert_frame_equal(_CParserPandas.read_csv(path, **kw), pd.read_csv(path, **kw))
    # a longer separator keeps the Python parser
    assert _CParserPandas.read_csv(path, **dict(kw, delimiter="\t\t", usecols=None)).shape[1] == 1
