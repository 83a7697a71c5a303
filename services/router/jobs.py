"""A queue of control-plane jobs (add/remove worker), run one at a time, readable by id."""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class JobKind(enum.Enum):
    ADD_WORKER = "add_worker"
    REMOVE_WORKER = "remove_worker"


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class Job:
    id: str
    kind: JobKind
    worker_url: str
    state: JobState = JobState.PENDING
    message: str = ""
    create_time: float = field(default_factory=time.time)
    update_time: float = field(default_factory=time.time)
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def set_state(self, state: JobState, message: str = "") -> None:
        self.state, self.message, self.update_time = state, message, time.time()
        if state in (JobState.SUCCEEDED, JobState.FAILED):
            self.done.set()


class JobQueue:
    """Runs jobs in submission order on one task; keeps the last ``history`` jobs readable."""

    def __init__(self, history: int = 1000) -> None:
        self._queue: asyncio.Queue[tuple[Job, Callable[[], Awaitable[str]]]] = asyncio.Queue()
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._history = history
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-jobs")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(self, kind: JobKind, worker_url: str, work: Callable[[], Awaitable[str]]) -> Job:
        job = Job(id=f"job-{next(self._ids)}", kind=kind, worker_url=worker_url)
        self._jobs[job.id] = job
        while len(self._jobs) > self._history:
            self._jobs.pop(next(iter(self._jobs)))
        self._queue.put_nowait((job, work))
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def _run(self) -> None:
        while True:
            job, work = await self._queue.get()
            job.set_state(JobState.RUNNING)
            try:
                job.set_state(JobState.SUCCEEDED, await work())
            except Exception as exc:  # a failed job is reported on the job, never crashes the loop
                log.warning("job %s (%s %s) failed: %s", job.id, job.kind.value, job.worker_url, exc)
                job.set_state(JobState.FAILED, str(exc))
