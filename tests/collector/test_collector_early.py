"""Early snapshots (expiration_id 3) at the collector, over real gRPC: judged (verdicts
name their rows) but counted apart, never stored by the sinks and never learned, so a
flow that arrives early and again at its end counts once."""

import numpy as np
from conftest import PacketsModel
from test_collector_policy import crafted, export


class LearningModel(PacketsModel):
    """PacketsModel that records which rows (by row_id) each call may learn from."""

    learns = True

    def __init__(self):
        self.calls = []

    def score(self, batch, learn_from=None):
        self.calls.append((sorted(int(i) for i in batch["row_id"]), learn_from))
        return super().score(batch)


def mixed():
    # rows 0-9; 2, 5 and 7 are early snapshots; score = packets / 100, flagged from 0.5
    b = crafted([10, 60, 70, 20, 90, 55, 30, 40, 80, 5], [1] * 10)
    exp = np.zeros(10, dtype=np.int8)
    exp[[2, 5, 7]] = 3
    b.columns["expiration_id"] = exp
    return b


def test_early_rows_are_judged_not_counted_or_stored(collector):
    srv = collector()
    ack, vb = export(srv, mixed())
    assert ack.rows_accepted == 10
    # flagged: 1 (0.6), 2 (0.7, early), 4 (0.9), 5 (0.55, early), 8 (0.8)
    assert [v.row for v in vb.verdicts] == [1, 2, 4, 5, 8]
    st = srv.stats()
    assert (st["rows_received"], st["rows_early"], st["early_flagged"]) == (10, 3, 2)
    assert (st["rows_scored"], st["rows_flagged"], st["rows_unscored"]) == (7, 3, 0)
    assert srv.sink.all_ids().tolist() == [0, 1, 3, 4, 6, 8, 9]  # final records only


def test_a_batch_of_only_early_rows_stores_nothing(collector):
    srv = collector()
    b = mixed()
    b.columns["expiration_id"] = np.full(10, 3, dtype=np.int8)
    ack, vb = export(srv, b)
    assert ack.rows_accepted == 10 and [v.row for v in vb.verdicts] == [1, 2, 4, 5, 8]
    st = srv.stats()
    assert (st["rows_early"], st["early_flagged"], st["rows_scored"], st["rows_flagged"]) == (10, 5, 0, 0)
    assert srv.sink.all_ids().tolist() == []


def test_early_rows_never_teach_the_baseline(collector):
    model = LearningModel()
    srv = collector(model=model, learn_from=("any",))
    export(srv, mixed())
    assert model.calls == [([0, 1, 3, 4, 6, 8, 9], "ipv4:127.0.0.1"), ([2, 5, 7], None)]
