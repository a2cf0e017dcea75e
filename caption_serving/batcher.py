"""One model shared by concurrent requests: its calls run one at a time in a thread of their
own, and the requests that queue up while a call runs go into the next call together.

Why: a TensorFlow call already uses every core, so two at once would only take turns on them.
Batching what is already waiting adds no latency when the server is idle (a lone request runs at
once), and under load the waiting images share one encoder pass, whose matmuls run better in a
batch (on the 2-core machine, 140 against 171 ms an image for the demo's export at beam 3; a
batch's decoding runs to its longest caption, though, and on a busy machine the two were within
noise).

Requests are only merged when every input without a batch dimension is equal (the same
signature, beam size, maximum length): those are one call's settings, not per image. Each
request gets back exactly its own rows of the outputs. A call that fails with several
requests in it is run again one request at a time, so one request's bad input fails that
request only.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request waiting for the model: its signature and inputs, the batch-major ones
    being those in `batched`, and the future its answer is set on."""

    signature: str
    inputs: dict[str, np.ndarray]
    batched: frozenset[str]
    future: asyncio.Future = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.inputs[next(iter(self.batched))]) if self.batched else 1

    def key(self) -> tuple:
        """Jobs with equal keys can share one call (a job with no batch-major input shares none)."""
        if not self.batched:
            return (id(self),)
        settings = tuple((name, a.dtype.str, a.shape, a.tolist() if a.dtype == object else a.tobytes())
                         for name, a in sorted(self.inputs.items()) if name not in self.batched)
        return (self.signature, self.batched, settings)


class Batcher:
    """run(signature, inputs) -> {output name: numpy} is the model call; it runs in one
    worker thread, so calls never overlap. Create and use it inside one event loop."""

    def __init__(self, run, max_batch: int = 16):
        self._run, self.max_batch = run, max_batch
        self._pending: list[Job] = []
        self._wake = asyncio.Event()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._worker: asyncio.Task | None = None
        self.calls = 0         # model calls made
        self.merged = 0        # calls that held more than one request

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True)

    async def submit(self, signature: str, inputs: dict[str, np.ndarray], batched: frozenset[str],
                     timeout: float) -> dict[str, np.ndarray]:
        """The outputs for these inputs; TimeoutError after `timeout` s (queued or running:
        a running call is not interrupted, but nobody waits for it any longer)."""
        job = Job(signature, inputs, frozenset(batched), asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return await asyncio.wait_for(job.future, timeout)

    # ------------------------------------------------------------------------------ worker
    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                jobs = self._take()
                if jobs:
                    await self._call(jobs)

    def _take(self) -> list[Job]:
        """The oldest live job and the later ones that can share its call, up to max_batch
        rows (the first is taken whatever its size: a request is never split)."""
        self._pending = [j for j in self._pending if not j.future.done()]  # timed out while queued
        if not self._pending:
            return []
        key, taken, rows, rest = self._pending[0].key(), [], 0, []
        for job in self._pending:
            if job.key() == key and (not taken or rows + job.size <= self.max_batch):
                taken.append(job)
                rows += job.size
            else:
                rest.append(job)
        self._pending = rest
        return taken

    async def _call(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._thread, self._run_merged, jobs)
        except Exception as e:
            if len(jobs) > 1:  # find whose input it was: each alone
                log.debug("a merged call of %d requests failed (%s); running them one by one", len(jobs), e)
                for job in jobs:
                    await self._call([job])
                return
            _settle(jobs[0], error=e)
            return
        for job, out in zip(jobs, outputs):
            _settle(job, result=out)

    def _run_merged(self, jobs: list[Job]) -> list[dict[str, np.ndarray]]:
        """One model call for all `jobs` (they share a key) -> each job's own outputs."""
        first = jobs[0]
        if len(jobs) == 1:
            inputs = first.inputs
        else:
            inputs = {name: (np.concatenate([j.inputs[name] for j in jobs]) if name in first.batched
                             else first.inputs[name]) for name in first.inputs}
        self.calls += 1
        self.merged += len(jobs) > 1
        out = self._run(first.signature, inputs)
        total = sum(j.size for j in jobs)
        if len(jobs) == 1:
            return [out]
        for name, a in out.items():
            if a.ndim == 0 or a.shape[0] != total:
                raise ValueError(f"output {name} is not batch-major (shape {a.shape}, {total} rows in)")
        parts, start = [], 0
        for job in jobs:
            parts.append({name: a[start:start + job.size] for name, a in out.items()})
            start += job.size
        return parts


def _settle(job: Job, result=None, error: BaseException | None = None) -> None:
    if job.future.done():  # its request timed out meanwhile: nobody is waiting
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)
