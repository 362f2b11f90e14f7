"""Group commit: one Redis pipeline carries the commits of many actors.

Actors run on their own threads and each waits for its own commit; the committer
thread drains whatever commits are queued (up to ``batch_max``) and sends them in
one round trip. A lone actor pays one thread hand-off; a thousand busy actors
share round trips instead of queueing for them. No reply and no side effect
leaves before its own commit returned: the waiting actor releases them itself.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from .checkpoint import CheckpointStore, CommitRequest, CommitResult

log = logging.getLogger(__name__)

_STOP = object()


class GroupCommitter:
    def __init__(self, store: CheckpointStore, batch_max: int = 256) -> None:
        self.store = store
        self.batch_max = batch_max
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="troth-committer", daemon=True)
        self._thread.start()

    def commit(self, request: CommitRequest) -> Future[CommitResult]:
        fut: Future[CommitResult] = Future()
        self._queue.put((request, fut))
        return fut

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            stop = item is _STOP
            batch: list[tuple[CommitRequest, Future[CommitResult]]] = [] if stop else [item]  # type: ignore[list-item]
            while not stop and len(batch) < self.batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                else:
                    batch.append(nxt)  # type: ignore[arg-type]
            if batch:
                self._flush(batch)
            if stop:
                return

    def _flush(self, batch: list[tuple[CommitRequest, Future[CommitResult]]]) -> None:
        try:
            results = self.store.commit_many([req for req, _ in batch])
        except Exception as exc:
            log.warning("group commit of %d transactions failed: %s", len(batch), exc)
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), res in zip(batch, results, strict=True):
            fut.set_result(res)
