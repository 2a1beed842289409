"""`response_webhook` calls: persisted jobs, leases, and the background worker.

A call with a webhook is answered `{"batchId": ...}` once its job is in the
store; every replica's worker scans the queue, claims a job with a lease
(`framework.serve.leases`), runs it through the normal path (parse, the version
resolved at acceptance, the same limits and row-error rules), keeps the answer, then
POSTs it to the webhook with retries. The answer is kept until delivered, so
a restart after the run delivers it without running it again; a job whose
run was interrupted runs again, the one case where a call runs twice.

Documents, all through the Store's small-documents API::

    jobs/<id>.json      the job: where it runs, its state, every delivery attempt
    jobs/<id>.request   the request body, as received
    jobs/<id>.result    the answer, from its run until it is delivered
    queue/<id>          present until the job is finished: what workers scan
    leases/<id>         which replica works on the job, and until when
    done/<time>.<id>    finished jobs by finishing time, for cleanup
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator

import orjson
from prometheus_client.core import CounterMetricFamily, Metric

from framework import encoding, protocol
from framework.serve import webhooks
from framework.execute.versions import VersionCache
from framework.errors import NotFound
from framework.serve.leases import Leases
from framework.serve.links import Links
from framework.store.base import Store

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("framework.serve.jobs")

FINISHED = ("delivered", "failed")
ID_RE = re.compile(r"^[0-9a-f]{32}$")
CLEAN_EVERY_S = 60.0
AnswerError = Callable[[BaseException], tuple[int, bytes]]


def is_batch_id(text: str) -> bool:
    return ID_RE.match(text) is not None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class Jobs:
    """One replica's side of the job queue: accepts jobs, and works on some."""

    def __init__(self, store: Store, server: dict[str, Any], versions: VersionCache, links: Links,
                 answer_error: AnswerError) -> None:
        self.store = store
        self.versions = versions
        self.links = links
        self.answer_error = answer_error
        self.allow = webhooks.Allow(server["webhook_allow"])
        self.timeout = float(server["async_timeout_seconds"])
        self.attempts = server["webhook_attempts"]
        self.backoff = float(server["webhook_backoff_seconds"])
        self.backoff_max = float(server["webhook_backoff_max_seconds"])
        self.hook_timeout = float(server["webhook_timeout_seconds"])
        self.leases = Leases(store, float(server["async_lease_seconds"]))
        self.poll = float(server["async_poll_seconds"])
        self.concurrency = server["async_concurrency"]
        self.retention = float(server["async_retention_seconds"])
        self.running: dict[str, asyncio.Task[None]] = {}
        self.counts: dict[str, dict[str, int]] = {"jobs": {}, "deliveries": {}}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    def _count(self, kind: str, outcome: str) -> None:
        self.counts[kind][outcome] = self.counts[kind].get(outcome, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """Prometheus collector: this replica's jobs and delivery attempts, by outcome."""
        jobs = CounterMetricFamily("framework_async_jobs", "Webhook jobs, by outcome "
                                   "(accepted, delivered, failed)", labels=["outcome"])
        deliveries = CounterMetricFamily("framework_webhook_deliveries",
                                         "Webhook delivery attempts, by outcome", labels=["outcome"])
        for family, kind in ((jobs, "jobs"), (deliveries, "deliveries")):
            for outcome, n in sorted(self.counts[kind].items()):
                family.add_metric([outcome], n)
        yield from (jobs, deliveries)

    # -- accepting ----------------------------------------------------------------

    async def accept(self, call: protocol.Call, body: bytes, branch: str, name: str, version: int,
                     base: str) -> bytes:
        """Persist a webhook call's job; the answer `{"batchId": ...}` once it is stored."""
        await webhooks.check_async(call.webhook, self.allow)
        job_id = uuid.uuid4().hex
        job = {"id": job_id, "state": "queued", "deployment": name, "branch": branch,
               "version": version, "webhook": call.webhook,
               "ignore_timeout": call.webhook_ignore_timeout, "base": base,
               "created_at": _now(), "finished_at": None, "runs": 0, "result_status": None,
               "error": None, "attempts": []}
        await asyncio.to_thread(self._persist, job_id, job, body)
        self._count("jobs", "accepted")
        if self._wake is not None:
            self._wake.set()
        return encoding.dumps({"batchId": job_id})

    def _persist(self, job_id: str, job: dict[str, Any], body: bytes) -> None:
        # The queue entry last: a job is only ever found with its request and document stored.
        self.store.write_doc(f"jobs/{job_id}.request", body, create=True)
        self.store.write_doc(f"jobs/{job_id}.json", orjson.dumps(job), create=True)
        self.store.write_doc(f"queue/{job_id}", b"{}", create=True)

    async def status(self, job_id: str) -> dict[str, Any]:
        """What `GET /v1/batches/<id>` shows of a job."""
        found = await asyncio.to_thread(self.store.read_doc, f"jobs/{job_id}.json") if ID_RE.match(
            job_id) else None
        if found is None:
            raise NotFound(f"no batch {job_id!r}: batch ids are the batchId a response_webhook call "
                           "answered; finished batches are kept server.async_retention_seconds")
        job = orjson.loads(found[0])
        shown = {k: v for k, v in job.items() if k not in ("id", "base", "webhook")}
        return {"batchId": job_id, "webhook": webhooks.shown(job["webhook"]), **shown}

    # -- the worker ---------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop working; jobs in hand are left to be taken up again (their leases released)."""
        tasks = [t for t in (self._task, *self.running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _loop(self) -> None:
        assert self._wake is not None
        cleaned = 0.0
        while True:
            self._wake.clear()
            try:
                await self._scan()
                if time.monotonic() - cleaned > CLEAN_EVERY_S:
                    cleaned = time.monotonic()
                    await asyncio.to_thread(self._cleanup)
            except Exception:  # a store hiccup: the next round tries again
                log.exception("job queue scan failed; retrying in %g s", self.poll)
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll)
            except asyncio.TimeoutError:
                pass

    async def _scan(self) -> None:
        for key in await asyncio.to_thread(self.store.list_docs, "queue/"):
            job_id = key.removeprefix("queue/")
            if job_id in self.running:
                continue
            if len(self.running) >= self.concurrency:
                return
            etag = await asyncio.to_thread(self.leases.claim, job_id)
            if etag is not None:
                task = asyncio.create_task(self._process(job_id, etag))
                self.running[job_id] = task
                task.add_done_callback(lambda t, j=job_id: self._finished(j, t))

    def _finished(self, job_id: str, task: asyncio.Task[None]) -> None:
        self.running.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s stopped on an error; it is taken up again once its lease expires",
                      job_id, exc_info=task.exception())
        if self._wake is not None:
            self._wake.set()  # room for another job

    async def _process(self, job_id: str, etag: str) -> None:
        work = asyncio.current_task()
        assert work is not None
        lease: dict[str, Any] = {"etag": etag, "lost": False}
        renewer = asyncio.create_task(self.leases.keep(job_id, lease, work))
        try:
            await self._work(job_id)
        except asyncio.CancelledError:
            renewer.cancel()
            if not lease["lost"]:  # stopping: released at once (not on a thread) for a successor
                self.leases.release(job_id, lease["etag"])
            raise
        except BaseException:
            renewer.cancel()  # the lease is left to expire: the job is tried again after it
            raise
        renewer.cancel()
        if not lease["lost"]:
            await asyncio.to_thread(self.leases.release, job_id, lease["etag"])

    async def _save(self, job: dict[str, Any]) -> None:
        await asyncio.to_thread(self.store.write_doc, f"jobs/{job['id']}.json", orjson.dumps(job))

    async def _work(self, job_id: str) -> None:
        found = await asyncio.to_thread(self.store.read_doc, f"jobs/{job_id}.json")
        job = orjson.loads(found[0]) if found is not None else None
        if job is None or job["state"] in FINISHED:
            await asyncio.to_thread(self.store.delete_doc, f"queue/{job_id}")
            return
        kept = await asyncio.to_thread(self.store.read_doc, f"jobs/{job_id}.result")
        if kept is not None:
            payload = kept[0]
        else:
            request = await asyncio.to_thread(self.store.read_doc, f"jobs/{job_id}.request")
            if request is None:
                job["error"] = "the job's request is missing from the store"
                return await self._finish(job, "failed")
            job["state"], job["runs"] = "running", job["runs"] + 1
            await self._save(job)
            job["result_status"], payload = await self.run(job, request[0])
            await asyncio.to_thread(self.store.write_doc, f"jobs/{job_id}.result", payload)
            job["state"] = "delivering"
            await self._save(job)
        await self._deliver(job, payload)

    async def run(self, job: dict[str, Any], body: bytes) -> tuple[int, bytes]:
        """The answer a synchronous call would have got, errors included."""
        try:
            call = protocol.parse(body)
            timeout = min(call.timeout or self.timeout, self.timeout)
            runner = await self.versions.runner(job["branch"], job["deployment"], job["version"], timeout)
            status, payload = await runner.run(call, timeout)
            if call.response_format == "links" and status == 200:
                url = await self.links.publish_async(job["base"], job["deployment"], payload)
                payload = encoding.dumps({"data": url})
            return status, payload
        except Exception as exc:  # as for a synchronous call, any failure is an answer
            return self.answer_error(exc)

    def _delay(self, done: int) -> float:
        return min(self.backoff * 2 ** (done - 1), self.backoff_max)

    async def _deliver(self, job: dict[str, Any], payload: bytes) -> None:
        if self._client is None:  # made at the first delivery: httpx slows the server's start
            self._client = webhooks.delivery_client()
        timeout = self.timeout if job["ignore_timeout"] else self.hook_timeout
        while len(job["attempts"]) < self.attempts:
            if job["attempts"]:
                await asyncio.sleep(self._delay(len(job["attempts"])))
            outcome = await webhooks.attempt(self._client, job["webhook"], self.allow, payload,
                                             job["id"], timeout)
            job["attempts"].append({"at": _now(), **outcome.as_doc()})
            self._count("deliveries", outcome.kind)
            if outcome.ok:
                return await self._finish(job, "delivered")
            if not outcome.retry:
                job["error"] = f"the webhook refused the answer ({outcome.error}); not retried"
                return await self._finish(job, "failed")
            await self._save(job)
        job["error"] = f"no delivery after {len(job['attempts'])} attempts (server.webhook_attempts)"
        await self._finish(job, "failed")

    async def _finish(self, job: dict[str, Any], state: str) -> None:
        job["state"], job["finished_at"] = state, _now()
        if state == "failed":
            log.warning("job %s for %s: webhook %s not delivered: %s", job["id"], job["deployment"],
                        webhooks.shown(job["webhook"]), job["error"])
        await self._save(job)
        self._count("jobs", state)
        await asyncio.to_thread(self._forget, job["id"])

    def _forget(self, job_id: str) -> None:
        self.store.write_doc(f"done/{int(time.time())}.{job_id}", b"{}")
        for key in (f"jobs/{job_id}.result", f"jobs/{job_id}.request", f"queue/{job_id}"):
            self.store.delete_doc(key)

    def _cleanup(self) -> None:
        """Expired link answers, and finished jobs past their retention."""
        self.links.cleanup()
        cutoff = time.time() - self.retention
        for key in self.store.list_docs("done/"):
            finished, _, job_id = key.removeprefix("done/").partition(".")
            if finished.isdigit() and int(finished) < cutoff:
                self.store.delete_doc(f"jobs/{job_id}.json")
                self.store.delete_doc(key)
