"""Concurrent requests answered together: one worker thread takes whatever is waiting (up to a batch), and
answers the jobs that share their settings in one detector / encoder / store pass.

The queue is bounded by admission, not by blocking: past `max_queue` waiting jobs a new one is refused at
once (the service answers 503 with Retry-After), so a burst never turns into an unbounded wait. One worker
means the models are used by one batch at a time, whoever asked: the service's endpoints, its writes and
the page mounted beside it."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass

from .live import LiveQuerier

log = logging.getLogger(__name__)

# answers a group of jobs of the same settings: (querier, settings, items) -> one result per item
Answer = Callable[[object, Hashable, list], list]


class Busy(Exception):
    """The queue is full: the caller should come back later."""


@dataclass(frozen=True)
class Job:
    answer: Answer
    key: Hashable
    item: object
    future: Future


class Batcher:
    def __init__(self, live: LiveQuerier, max_batch: int = 8, max_queue: int = 32,
                 on_batch: Callable[[int], None] = lambda size: None):
        self.live, self.max_batch, self.max_queue, self.on_batch = live, max_batch, max_queue, on_batch
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting = 0
        self._count = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="cbir-batcher", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Jobs waiting or being answered (a cancelled one no longer counts)."""
        return self._waiting

    def submit(self, answer: Answer, key: Hashable, item: object) -> Future:
        """Queue one job; jobs with the same `answer` and `key` may be answered together. Raises Busy."""
        with self._count:
            if self._waiting >= self.max_queue:
                raise Busy(f"{self._waiting} requests are waiting")
            self._waiting += 1
        job = Job(answer, key, item, Future())
        job.future.add_done_callback(lambda f: f.cancelled() and self._release(1))  # a caller gave up: its slot frees
        self._jobs.put(job)
        return job.future

    def _release(self, n: int) -> None:
        with self._count:
            self._waiting -= n

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=30)

    def _take(self) -> list[Job] | None:
        first = self._jobs.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]  # a timed-out caller's job is dropped
            querier = self.live.current()  # one index version for the whole batch
            groups: dict[tuple, list[Job]] = {}
            for job in live:
                groups.setdefault((job.answer, job.key), []).append(job)
            for (answer, key), jobs in groups.items():
                self.on_batch(len(jobs))
                try:
                    results = answer(querier, key, [j.item for j in jobs])
                except BaseException as e:  # every caller gets the failure; the worker goes on
                    for job in jobs:
                        job.future.set_exception(e)
                else:
                    for job, result in zip(jobs, results):  # an answer may be one caller's own error
                        if isinstance(result, BaseException):
                            job.future.set_exception(result)
                        else:
                            job.future.set_result(result)
            self._release(len(live))
