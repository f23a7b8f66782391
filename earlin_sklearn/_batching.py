"""Dynamic batching for the cloud server: requests that arrive within a short window run as one batch.

A fleet sends one input per request; the cloud part is far cheaper per input
on a batch. :class:`DynamicBatcher` queues each request's tensors, and one
asyncio task takes the first waiting request, then every request that
arrives within ``max_wait_ms`` (up to ``max_batch`` inputs), concatenates
them, runs ``compute`` once in a worker thread and hands each request its
own rows. A request announced by the server (:meth:`DynamicBatcher.expecting`)
that is still being read (announced, not yet submitted) counts as on its
way; when none is, the batch runs at once, so a lone client pays no wait,
and the next batch starts as soon as the last one is done while the event
loop still writes that one's answers (without announcements, a batch always
waits the full window). Order is kept; a request whose rows come out non-finite gets its
own error and never fails its batch-mates; if the batched run itself raises,
each request is run alone so that only the one at fault fails. The queue is
bounded (``max_queue`` inputs): past it, :class:`QueueFull` (the server
answers 503 with ``Retry-After``, which the edge runner retries).
"""

import asyncio
import contextlib
import contextvars
import time

import torch

# the announcement of the request this task serves: (batcher, [still counted in its arriving])
_ANNOUNCEMENT = contextvars.ContextVar("earlin_batcher_announcement", default=None)


class QueueFull(Exception):
    """The batcher holds ``max_queue`` inputs already."""


class DynamicBatcher:
    """Run ``compute(tensors) -> logits-like output`` on batches gathered from concurrent requests.

    Parameters
    ----------
    compute : callable
        ``compute(list of tensors (N, ...)) -> out``, where ``out`` is a
        tensor (N, ...) or a tuple/list of them; run in a worker thread.
    max_batch : int, default=64
        Most inputs in one run of ``compute``.
    max_wait_ms : float, default=2.0
        How long the first request of a batch waits for others. 0: run each
        request as it comes (no batching).
    max_queue : int, default=1024
        Most inputs waiting; a request beyond it raises :class:`QueueFull`.
    on_batch : callable, default=None
        ``on_batch(n_inputs, seconds)`` after each run (metrics).
    """

    def __init__(self, compute, max_batch=64, max_wait_ms=2.0, max_queue=1024, on_batch=None):
        if int(max_batch) < 1 or float(max_wait_ms) < 0 or int(max_queue) < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0.")
        self.compute, self.max_batch, self.max_wait = compute, int(max_batch), float(max_wait_ms) / 1e3
        self.max_queue, self.on_batch = int(max_queue), on_batch
        self.waiting = 0  # inputs queued, not yet taken into a batch
        self.arriving = 0  # requests announced (see expecting) and not yet submitted
        self.announced = False  # whether requests are announced at all (else every batch waits the full window)
        self._queue = self._loop = self._task = None

    @contextlib.contextmanager
    def expecting(self):
        """Announce a request from its first byte to its submission (or its end, if it never submits): a batch
        waits for batch-mates only while some announced request has not been submitted, so a lone client never
        waits ``max_wait_ms``, nor does a batch wait for requests that are only being answered."""
        self.announced = True
        cell = [True]  # this request's announcement, still counted in ``arriving``
        self.arriving += 1
        reset = _ANNOUNCEMENT.set((self, cell))
        try:
            yield
        finally:
            _ANNOUNCEMENT.reset(reset)
            self._arrived(cell)

    def _arrived(self, cell):
        if cell[0]:
            cell[0] = False
            self.arriving -= 1

    @property
    def depth(self):
        """Inputs waiting for a batch."""
        return self.waiting

    async def submit(self, tensors):
        """``(rows, seconds, batch inputs)``: the output rows of this request's inputs (each tensor's first axis
        is the request's batch), and the compute time and size of the batch they ran in."""
        n = int(tensors[0].shape[0])
        if self.waiting + n > self.max_queue:
            raise QueueFull(f"{self.waiting} inputs are waiting (the limit is {self.max_queue})")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            # one queue and one batching task per event loop (a test client may run each session in its own)
            self._queue, self._loop, self.waiting = asyncio.Queue(), loop, 0
            self._task = loop.create_task(self._run())
        future = loop.create_future()
        announcement = _ANNOUNCEMENT.get()
        if announcement is not None and announcement[0] is self:
            self._arrived(announcement[1])  # this request is no longer on its way
        self.waiting += n
        await self._queue.put((tensors, n, future))
        return await future

    async def _run(self):
        loop = asyncio.get_running_loop()
        carry = None  # a request that did not fit the last batch: it starts the next one
        while True:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            batch, size = [first], first[1]
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0 or (self.announced and self.arriving == 0):  # nobody else on the way
                        break
                    await asyncio.sleep(min(remaining, 0.0005))  # polled: no get() is ever cancelled mid-way
                    continue
                item = self._queue.get_nowait()
                if size + item[1] > self.max_batch:
                    carry = item
                    break
                batch.append(item)
                size += item[1]
            self.waiting -= size
            try:
                await self._dispatch(batch, size)
            except Exception as exc:  # never leave a request waiting
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)

    async def _dispatch(self, batch, size):
        live = [(t, n, f) for t, n, f in batch if not f.done()]  # a client that went away is skipped
        if not live:
            return
        size = sum(n for _, n, _ in live)
        t0 = time.perf_counter()
        try:
            joined = live[0][0] if len(live) == 1 else [torch.cat([t[i] for t, _, _ in live])
                                                       for i in range(len(live[0][0]))]
            out = await asyncio.to_thread(self.compute, joined)
        except Exception as exc:
            if len(live) == 1:
                _settle(live[0][2], exc)
            else:  # one request at fault: run each alone, so that only it fails
                for tensors, n, future in live:
                    t1 = time.perf_counter()
                    try:
                        _settle(future, result=(await asyncio.to_thread(self.compute, tensors),
                                                time.perf_counter() - t1, n))
                    except Exception as alone:
                        _settle(future, alone)
            return
        seconds = time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(size, seconds)
        start = 0
        for _, n, future in live:
            rows = _rows(out, start, start + n)
            start += n
            _settle(future, result=(rows, seconds, size))


def _settle(future, exc=None, result=None):
    """Answer a request's future, unless its client went away (cancelled)."""
    if not future.done():
        future.set_exception(exc) if exc is not None else future.set_result(result)


def _rows(out, start, stop):
    if isinstance(out, (tuple, list)):
        return type(out)(_rows(o, start, stop) for o in out)
    return out[start:stop]
