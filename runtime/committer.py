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

_Item = tuple[CommitRequest, "Future[CommitResult]"]


class GroupCommitter:
    def __init__(self, store: CheckpointStore, batch_max: int = 256) -> None:
        self.store = store
        self.batch_max = batch_max
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()  # None: stop
        self._thread = threading.Thread(target=self._run, name="troth-committer", daemon=True)
        self._thread.start()

    def commit(self, request: CommitRequest) -> Future[CommitResult]:
        fut: Future[CommitResult] = Future()
        self._queue.put((request, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[_Item] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= self.batch_max:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._flush(batch)
            if item is None:
                return

    def _flush(self, batch: list[_Item]) -> None:
        try:
            results = self.store.commit_many([req for req, _ in batch])
        except Exception as exc:
            log.warning("group commit of %d transactions failed: %s", len(batch), exc)
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), res in zip(batch, results, strict=True):
            fut.set_result(res)
