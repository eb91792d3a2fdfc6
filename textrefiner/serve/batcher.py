"""One model worker that batches concurrent requests together.

Requests put their preprocessed images in a queue bounded by a count of images (a full queue is
refused at once: the server answers 503 instead of growing without bound). The worker thread takes
the first waiting request, then gathers others for at most `window` seconds or until `max_batch`
images are together, runs each class list's images as one batch, and hands every request its rows.
Everything that touches the model (class lists' models, explanations) runs on this one thread.
"""
import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


class QueueFull(Exception):
    """More images are waiting than the queue holds."""


@dataclass
class _Job:
    images: Optional[torch.Tensor]  # [n, 3, H, W]; None for a call job
    key: Any  # the class list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    call: Optional[Callable[[], Any]] = None  # run alone on the worker (an explanation)
    size: int = field(default=1)


class Batcher:
    def __init__(self, compute: Callable[[torch.Tensor, Any], torch.Tensor], max_batch: int = 32,
                 window: float = 0.005, max_queued: int = 512, log=None):
        self.compute, self.max_batch, self.window = compute, max(1, max_batch), max(0.0, window)
        self.max_queued = max(1, max_queued)
        self._log = log or (lambda message: None)
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._queued = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="textrefiner-serve-model",
                                        daemon=True)
        self.batches = self.images = 0  # run so far (/health: their ratio is the mean batch)

    def start(self):
        self._thread.start()

    def stop(self, timeout: Optional[float] = None):
        """Finish what is queued, then end the worker."""
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------ the request side (event loop)
    async def predict(self, images: torch.Tensor, key) -> torch.Tensor:
        """Probabilities [n, C] of `images` for the class list `key`; raises QueueFull."""
        return await self._submit(images, key, None, images.shape[0])

    async def call(self, function: Callable[[], Any]):
        """Run `function` on the model worker (between batches); raises QueueFull."""
        return await self._submit(None, None, function, 1)

    async def _submit(self, images, key, call, size):
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._queued + size > self.max_queued:
                raise QueueFull()
            self._queued += size
        job = _Job(images, key, loop.create_future(), loop, call, size)
        self._queue.put(job)
        return await job.future

    # ------------------------------------------------------------ the worker thread
    def _take(self, job: _Job) -> _Job:
        with self._lock:
            self._queued -= job.size
        return job

    def _work(self):
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [self._take(first)]
            stop = False
            if first.call is None:
                stop = self._gather(jobs)
            self._run(jobs)
            if stop:
                return

    def _gather(self, jobs) -> bool:
        """Add waiting prediction jobs to `jobs` until the window closes or the batch is full;
        True when the stop mark was met (after which nothing more arrives)."""
        count = jobs[0].size
        deadline = time.monotonic() + self.window
        while count < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if job is None:
                return True
            jobs.append(self._take(job))
            count += job.size
        return False

    def _run(self, jobs):
        calls = [job for job in jobs if job.call is not None]
        for job in calls:
            self._settle(job, job.call)
        groups = {}
        for job in jobs:
            if job.call is None:
                groups.setdefault(job.key, []).append(job)
        for key, group in groups.items():
            live = [job for job in group if not job.future.done()]  # cancelled: client gone
            if not live:
                continue
            try:
                rows = self._compute(torch.cat([job.images for job in live]), key)
            except Exception as exc:  # the requests' error, reported to each of them
                for job in live:
                    job.loop.call_soon_threadsafe(_set_exception, job.future, exc)
                continue
            start = 0
            for job in live:
                part = rows[start:start + job.size]
                start += job.size
                job.loop.call_soon_threadsafe(_set_result, job.future, part)

    def _compute(self, batch, key):
        self.images += batch.shape[0]
        self.batches += -(-batch.shape[0] // self.max_batch)
        parts = [self.compute(batch[i:i + self.max_batch], key)
                 for i in range(0, batch.shape[0], self.max_batch)]
        return torch.cat(parts)

    def _settle(self, job, function):
        try:
            result = function()
        except Exception as exc:
            job.loop.call_soon_threadsafe(_set_exception, job.future, exc)
        else:
            job.loop.call_soon_threadsafe(_set_result, job.future, result)


def _set_result(future, value):
    if not future.done():
        future.set_result(value)


def _set_exception(future, exc):
    if not future.done():
        future.set_exception(exc)
