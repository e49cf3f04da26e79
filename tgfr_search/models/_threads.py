"""One torch thread for small CPU batches: a query's heads (and torch MiniLM), not a gallery's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

SMALL_BATCH = 4
_lock = threading.RLock()


@contextmanager
def few_threads(n_items: int, device: str = "cpu") -> Iterator[None]:
    """Run torch on one intra-op thread while encoding at most `SMALL_BATCH` items on the CPU.

    A one-sentence MiniLM forward is a few ms of work; split over two OpenMP threads on a busy
    2-core machine it waited for a descheduled thread at every layer: 89 ms p50 and 514 ms p95
    against 14 ms and 19 ms on one thread (benchmarks/query_latency.py, load average 3-9).
    Larger batches keep torch's setting.
    """
    if device != "cpu" or n_items > SMALL_BATCH:
        yield
        return
    import torch

    with _lock:  # torch's thread count is process-wide
        before = torch.get_num_threads()
        if before == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
