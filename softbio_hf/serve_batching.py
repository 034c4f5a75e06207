"""The server's one model thread: faces from requests that arrive together go through one forward pass.

A request hands its face crops (uint8 [F, 3, S, S]) to `BatchScheduler.submit` and gets a Future of their
per-task probabilities. The scheduler thread takes the oldest waiting job, then gathers more for at most
`max_wait_s` or until `max_batch` faces are waiting, runs them as one batch (a job larger than `max_batch` alone
is cut into forward passes of `max_batch`), and hands each job exactly its own rows. A job whose Future was
cancelled (its client went away) or whose deadline passed before its turn costs no forward pass.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_WAIT_MS = 5.0


class DeadlineExceeded(Exception):
    """A job whose request can no longer be answered in time: it is dropped before its forward pass."""


@dataclass
class Job:
    crops: np.ndarray
    deadline: float
    future: Future = field(default_factory=Future)


class BatchScheduler:
    """
    `forward(crops)` -> {task: probabilities [F, C]} run on batches gathered across requests, on one thread.
    Counts what a test and /metrics need: forward passes, the faces in each, and the seconds per face.
    """

    def __init__(
        self,
        forward: Callable[[np.ndarray], dict[str, np.ndarray]],
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait_s: float = DEFAULT_MAX_WAIT_MS / 1000,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.forward, self.max_batch, self.max_wait_s = forward, max_batch, max_wait_s
        self.on_batch = on_batch  # (faces, seconds) of each forward pass, for the metrics
        self.forward_passes = 0
        self.seconds_per_face = 0.0  # a moving average, for Retry-After
        self.failed: str | None = None  # the last forward pass's error, for readiness
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="softbio-batcher", daemon=True)
        self._thread.start()

    def submit(self, crops: np.ndarray, deadline: float) -> Future:
        job = Job(crops, deadline)
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()
        return job.future

    def waiting_faces(self) -> int:
        with self._ready:
            return sum(len(job.crops) for job in self._jobs)

    def stop(self) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            if batch:
                self._answer(batch)

    def _gather(self) -> list[Job] | None:
        """The next batch: the oldest job, and those that join it within max_wait_s, up to max_batch faces."""
        with self._ready:
            while not self._jobs and not self._stopped:
                self._ready.wait()
            if self._stopped and not self._jobs:
                return None
            closes = time.monotonic() + self.max_wait_s
            while self._faces_waiting() < self.max_batch and not self._stopped:
                left = closes - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            batch, faces = [], 0
            while self._jobs and (not batch or faces + len(self._jobs[0].crops) <= self.max_batch):
                job = self._jobs.popleft()
                if self._runnable(job):
                    batch.append(job)
                    faces += len(job.crops)
            return batch

    def _faces_waiting(self) -> int:
        return sum(len(job.crops) for job in self._jobs)

    @staticmethod
    def _runnable(job: Job) -> bool:
        """False for a job nobody waits for any more (cancelled) or that came too late; it gets no forward pass."""
        if not job.future.set_running_or_notify_cancel():
            return False
        if time.monotonic() > job.deadline:
            job.future.set_exception(DeadlineExceeded())
            return False
        return True

    def _answer(self, batch: list[Job]) -> None:
        crops = np.concatenate([job.crops for job in batch])
        started = time.monotonic()
        try:
            probs = {}
            for start in range(0, len(crops), self.max_batch):  # one job over max_batch: several passes
                self.forward_passes += 1
                part = self.forward(crops[start : start + self.max_batch])
                for task, values in part.items():
                    probs.setdefault(task, []).append(values)
            joined = {task: np.concatenate(values) for task, values in probs.items()}
        except Exception as error:  # every waiting request hears of it; readiness turns false
            self.failed = f"{type(error).__name__}: {error}"
            for job in batch:
                job.future.set_exception(error)
            return
        self.failed = None
        seconds = time.monotonic() - started
        per_face = seconds / len(crops)
        self.seconds_per_face = 0.8 * self.seconds_per_face + 0.2 * per_face if self.seconds_per_face else per_face
        if self.on_batch is not None:
            self.on_batch(len(crops), seconds)
        start = 0
        for job in batch:
            rows = slice(start, start + len(job.crops))
            job.future.set_result({task: values[rows] for task, values in joined.items()})
            start += len(job.crops)
