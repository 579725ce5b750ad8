"""`data.pipeline.started`: the next epoch's first batch is fetched ahead, and nothing is lost or reordered."""

import threading
import time

import pytest

from data.pipeline import started


def test_the_first_item_is_fetched_before_iteration_and_the_order_is_kept():
    produced = threading.Event()
    consumer = threading.get_ident()
    producer = []

    def epoch():
        time.sleep(0.05)  # a pipeline's start-up
        producer.append(threading.get_ident())
        produced.set()
        yield from range(5)

    batches = started(epoch())
    assert produced.wait(5), "the first item was not fetched ahead of iteration"
    assert producer[0] != consumer  # on the prefetch thread, while the caller did other work
    assert list(batches) == [0, 1, 2, 3, 4]


def test_an_empty_epoch_and_an_error_reach_the_consumer():
    assert list(started(iter([]))) == []

    def broken():
        raise OSError("shard-00003.parquet: connection reset")
        yield

    batches = started(broken())
    with pytest.raises(OSError, match="shard-00003"):
        next(batches)
