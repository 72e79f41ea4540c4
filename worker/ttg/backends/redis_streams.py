"""Redis Streams backend: a consumer group per run, leases renewed, dead workers reclaimed.

- Lease: XREADGROUP. A worker's in-hand entries are renewed by a heartbeat thread
  (XCLAIM ... JUSTID with min-idle 0, only on entries it still owns), so only a dead worker's
  entries ever go idle.
- Reclaim: XAUTOCLAIM with min-idle `min_idle_ms`, continuing its cursor over the whole
  pending list. A restarted worker first takes back its own pending entries (XREADGROUP 0).
- Retry: a task that raises is re-queued at once with attempt+1 (new entry, old one acked and
  deleted in the same script); a chunk whose attempts plus deliveries pass `max_attempts`
  is dead-lettered with its last error or "lost its worker N times".
- Completion: result HSETNX + XACK + XDEL in one Lua script; acked entries are deleted, so the
  stream only ever holds queued and in-flight chunks and XLEN stays bounded.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import redis.exceptions as rex

from ttg import metrics
from ttg.backends import policy
from ttg.backends.base import BrokerConfig, Delivery, Progress
from ttg.backends.redis_store import GROUP, Keys, RedisStore
from ttg.partial import Partial, encode_result
from ttg.sweep import JobSpec, strict_int

log = logging.getLogger("ttg.redis")

# KEYS: tasks, workers   ARGV: group, consumer, now, ids...
RENEW_LUA = """
local n = 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return n
"""

# KEYS: tasks, stats, events   ARGV: group, old id, chunk, start, end, attempt, error, task_s,
#                                 worker, now
RETRY_LUA = """
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'ts', ARGV[10], 'kind', 'retried',
           'chunk', ARGV[3], 'attempt', ARGV[6], 'worker', ARGV[9], 'error', ARGV[7])
redis.call('XADD', KEYS[1], '*', 'c', ARGV[3], 's', ARGV[4], 'e', ARGV[5], 'a', ARGV[6],
           'err', ARGV[7])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'retried', 1)
redis.call('HINCRBY', KEYS[2], 'executions', 1)
redis.call('HINCRBYFLOAT', KEYS[2], 'task_s', ARGV[8])
return 1
"""

# KEYS: tasks   ARGV: group, old id, chunk, start, end, attempt
RELEASE_LUA = """
redis.call('XADD', KEYS[1], '*', 'c', ARGV[3], 's', ARGV[4], 'e', ARGV[5], 'a', ARGV[6])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

SUBMIT_BATCH = 1000
TASK_FIELDS = frozenset({"c", "s", "e", "a", "err"})


class MalformedMessage(ValueError):
    """A message no worker can run; `chunk` is its chunk id when that much was readable."""

    def __init__(self, reason: str, chunk: int = -1) -> None:
        super().__init__(reason)
        self.chunk = chunk


def _raw(fields: object) -> str:
    try:
        return repr(fields)[:2000]
    except Exception:  # noqa: BLE001 - a repr of what Redis returned cannot fail, but be sure
        return "<unprintable>"


def parse_task_entry(spec: JobSpec, fields: dict) -> tuple[int, int, int, int, str | None]:
    """(chunk, start, end, attempt, last error) of a task entry `{c, s, e, a[, err]}` that
    another process wrote; MalformedMessage with the reason for anything else. Pure: the
    property tests run it on arbitrary input."""
    if not isinstance(fields, dict):
        raise MalformedMessage(f"not a field map: {type(fields).__name__}")
    chunk = -1
    try:
        unknown = sorted(str(k)[:40] for k in fields if k not in TASK_FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown[:5]}")
        if "c" not in fields:
            raise ValueError("no chunk field 'c'")
        chunk = strict_int(fields["c"], "chunk")
        start, end = spec.bounds(chunk)
        attempt = strict_int(fields.get("a", "1"), "attempt")
        if not 1 <= attempt <= spec.max_attempts:
            raise ValueError(f"attempt {attempt} outside 1..{spec.max_attempts}")
        if "s" in fields or "e" in fields:
            got = (strict_int(fields.get("s"), "start"), strict_int(fields.get("e"), "end"))
            if got != (start, end):
                raise ValueError(f"bounds {got[0]}..{got[1]} do not match the job")
        err = fields.get("err")
        if err is not None and not isinstance(err, str):
            raise ValueError("err is not text")
    except ValueError as exc:
        raise MalformedMessage(f"{exc}"[:500], max(chunk, -1)) from None
    return chunk, start, end, attempt, err


class RedisStreamsBackend(RedisStore):
    name = "redis"

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__(config)
        self._renew = self.r.register_script(RENEW_LUA)
        self._retry = self.r.register_script(RETRY_LUA)
        self._release = self.r.register_script(RELEASE_LUA)
        self._buffer: collections.deque[Delivery] = collections.deque()
        self._in_hand: dict[str, Delivery] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._cursor = "0-0"
        self._last_reclaim = 0.0
        self._own_pel_checked = False
        self._ewma_task_s: float | None = None
        self._pending: list[tuple[Delivery, str, float, bytes]] = []
        self._pending_since = 0.0

    @property
    def renew_interval_s(self) -> float:
        return max(self.config.min_idle_ms / 3000.0, 0.05)

    # ---- controller -------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> bool:
        k = Keys(spec.run_id)
        created = self._create_meta(spec)
        if not created:
            if not self.r.hexists(k.meta, "enqueued"):  # an earlier submit died half-way
                self.reconcile(spec.run_id)
                self.r.hset(k.meta, "enqueued", spec.chunks_total)
            return False
        self._ensure_group(k)
        self._enqueue(spec, range(spec.chunks_total))
        self.r.hset(k.meta, "enqueued", spec.chunks_total)
        return True

    def _enqueue(self, spec: JobSpec, chunks: range | list[int]) -> None:
        """XADD chunk messages, SUBMIT_BATCH per round trip."""
        k = Keys(spec.run_id)

        def add(pipe: Any, part: range | list[int]) -> None:
            for chunk in part:
                s, e = spec.bounds(chunk)
                pipe.xadd(k.tasks, {"c": chunk, "s": s, "e": e, "a": 1})

        for first in range(0, len(chunks), SUBMIT_BATCH):
            part = chunks[first:first + SUBMIT_BATCH]
            self.batch(lambda pipe, part=part: add(pipe, part))

    def _ensure_group(self, k: Keys) -> None:
        try:
            self.retrying(lambda: self.r.xgroup_create(k.tasks, GROUP, id="0", mkstream=True))
        except rex.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _stream_chunks(self, k: Keys) -> tuple[set[int], int]:
        """Chunks present in the stream (queued or in flight) and the in-flight count."""
        present: set[int] = set()
        last = "-"
        while True:
            page = self.retrying(lambda m=last: self.r.xrange(k.tasks, min=m, max="+", count=5000))
            if last != "-" and page and page[0][0] == last:
                page = page[1:]
            if not page:
                break
            for _id, fields in page:
                try:
                    present.add(int(fields["c"]))
                except (KeyError, ValueError):
                    pass
            last = page[-1][0]
        try:
            pending = self.r.xpending(k.tasks, GROUP)["pending"]
        except rex.ResponseError:
            pending = 0
        return present, pending

    def progress(self, run_id: str) -> Progress:
        spec = self.submitted_spec(run_id)
        p = self.base_progress(run_id, spec)
        k = Keys(run_id)
        try:
            length, pending = self.batch(lambda p: (p.xlen(k.tasks), p.xpending(k.tasks, GROUP)))
            p.in_flight = pending["pending"]
            p.queued = max(length - p.in_flight, 0)
        except rex.ResponseError:  # no group yet
            pass
        return p

    def reconcile(self, run_id: str) -> list[int]:
        spec = self.submitted_spec(run_id)
        k = Keys(run_id)
        self._ensure_group(k)
        # Stream first, then results: a chunk finishing in between is seen in the stream,
        # so the race can only cause a harmless duplicate, never a miss.
        present, _ = self._stream_chunks(k)
        done = {int(c) for c in self.r.hkeys(k.results)}
        dead = {d.chunk for d in self.dead_letters(run_id)}
        missing = sorted(set(range(spec.chunks_total)) - present - done - dead)
        self._enqueue(spec, missing)
        if missing:
            self.r.hincrby(k.stats, "reconciled", len(missing))
            self.r.xadd(k.events, {"ts": f"{time.time():.6f}", "kind": "reconciled",
                                   "chunks": ",".join(map(str, missing[:1000]))},
                        maxlen=100000, approximate=True)
            log.warning("reconcile re-enqueued %d chunk(s): %s", len(missing), missing[:20])
        return missing

    def replay_dead(self, run_id: str, chunks: list[int] | None = None) -> list[int]:
        spec = self.submitted_spec(run_id)
        k = Keys(run_id)
        replayed = []
        for entry_id, f in self.r.xrange(k.dlq):
            try:
                chunk = int(f.get("chunk", "-1"))
                s, e = spec.bounds(chunk)
            except ValueError:
                continue  # a malformed message stays where it is: there is nothing to replay
            if chunks is not None and chunk not in chunks:
                continue
            self.batch(lambda p, c=chunk, s=s, e=e, i=entry_id: (
                p.xadd(k.tasks, {"c": c, "s": s, "e": e, "a": 1}), p.xdel(k.dlq, i)),
                transaction=True)
            replayed.append(chunk)
        return sorted(set(replayed))

    # ---- worker -----------------------------------------------------------------------
    def start_consuming(self, run_id: str, worker_id: str,
                        worker_index: int | None) -> JobSpec | None:
        self.keys = k = Keys(run_id)
        self.worker_id = worker_id
        self._ensure_group(k)
        self.heartbeat()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._renewer.start()
        # The fleet may start before the job is submitted: block on the stream itself, so the
        # first chunk is taken the moment it is enqueued (the job's meta is written first).
        early: list = []
        spec = self.load_spec(run_id)
        while spec is None:
            if self.stop_requested():
                return None
            got = self.retrying(lambda: self.r.xreadgroup(
                GROUP, self.worker_id, {k.tasks: ">"}, count=max(self.config.prefetch, 1),
                block=1000))
            for _s, entries in got or []:
                early.extend(entries)
            spec = self.load_spec(run_id)
        self.spec = spec
        for entry_id, fields in early:
            self._push(entry_id, fields, reclaimed=False)
        return spec

    def _renew_loop(self) -> None:
        assert self.keys is not None
        while not self._stop.wait(self.renew_interval_s):
            with self._lock:
                ids = list(self._in_hand)
            try:
                self._renew(keys=[self.keys.tasks, self.keys.workers],
                            args=[GROUP, self.worker_id, f"{time.time():.3f}", *ids])
            except rex.RedisError as exc:  # the main loop handles reconnects
                log.debug("lease renewal failed: %s", exc)

    def _parse(self, entry_id: str, fields: dict | None, reclaimed: bool) -> Delivery | None:
        """A Delivery, or None after dead-lettering a malformed entry (with the reason and the
        raw fields; the entry is acked and deleted, so it can never come back)."""
        assert self.spec is not None
        if not fields:  # deleted while pending: nothing left to do
            self.retrying(lambda: self.r.xack(self.keys.tasks, GROUP, entry_id))
            return None
        try:
            task = parse_task_entry(self.spec, fields)
        except MalformedMessage as exc:
            reason = f"malformed message: {exc}"
            log.error("dead-lettering entry %s: %s", entry_id, reason)
            self.dead_letter(exc.chunk, reason, 0, entry_id=entry_id, raw=_raw(fields))
            metrics.CHUNKS_DEAD.inc()
            return None
        chunk, start, end, attempt, err = task
        return Delivery(self.spec.run_id, chunk, start, end, attempt, token=entry_id,
                        reclaimed=reclaimed, last_error=err)

    def _deliveries(self, d: Delivery) -> int:
        info = self.r.xpending_range(self.keys.tasks, GROUP, d.token, d.token, 1)
        return int(info[0]["times_delivered"]) if info else 1

    def _admit(self, d: Delivery) -> Delivery | None:
        """Check a reclaimed delivery against the attempt limit; take it in hand."""
        assert self.spec is not None
        if d.reclaimed:
            lost = self._deliveries(d) - 1
            reason = policy.lost_too_often(self.spec, d.attempt, lost, d.last_error)
            if reason is not None:
                log.error("dead-lettering: %s", reason, extra={"chunk": d.chunk})
                self._drop(d)
                self.dead_letter(d.chunk, reason, d.attempt + lost, entry_id=d.token)
                metrics.CHUNKS_DEAD.inc()
                return None
            self.r.hincrby(self.keys.stats, "reclaimed", 1)
            self.event("reclaimed", chunk=d.chunk, attempt=d.attempt, delivery=lost + 1)
            log.info("reclaimed chunk (delivery %d)", lost + 1,
                     extra={"chunk": d.chunk, "attempt": d.attempt})
        return d

    def _fill(self, timeout_s: float) -> None:
        assert self.keys is not None
        k = self.keys
        count = self.batch_size()
        # Chunks taken over from a dead worker (or from this worker's previous life) come one
        # at a time: each such take counts as a delivery, and a chunk that never ran must
        # not reach the delivery limit because a poisoned neighbour of its batch kept
        # killing its workers.
        if not self._own_pel_checked:  # a restarted worker takes back what it held
            got = self.retrying(lambda: self.r.xreadgroup(GROUP, self.worker_id,
                                                          {k.tasks: "0"}, count=1))
            entries = [e for _s, es in got or [] for e in es]
            for entry_id, fields in entries:
                self._push(entry_id, fields, reclaimed=True)
            if not entries:
                self._own_pel_checked = True
            if self._buffer:
                return
        now = time.monotonic()
        if now - self._last_reclaim >= self.renew_interval_s:
            self._last_reclaim = now
            self._reclaim(1)
            if self._buffer:  # found a dead worker's chunk: look again right after this one
                self._last_reclaim = 0.0
                return
        got = self.retrying(lambda: self.r.xreadgroup(
            GROUP, self.worker_id, {k.tasks: ">"}, count=count,
            block=max(int(timeout_s * 1000), 1)))
        for _s, entries in got or []:
            for entry_id, fields in entries:
                self._push(entry_id, fields, reclaimed=False)

    def _push(self, entry_id: str, fields: dict | None, reclaimed: bool) -> None:
        d = self._parse(entry_id, fields, reclaimed)
        if d is not None:
            with self._lock:  # renewed from now on, even before it starts
                self._in_hand[d.token] = d
            self._buffer.append(d)

    def batch_size(self) -> int:
        """Chunks per lease round trip: the configured prefetch, or (prefetch 0 = auto) as
        many as take about 20 ms of work, 1 to 32. Short chunks then share round trips;
        chunks of 20 ms and more are leased one by one, so a kill never strands a queue."""
        if self.config.prefetch > 0:
            return self.config.prefetch
        if self._ewma_task_s is None:
            return 1
        return max(1, min(32, int(0.02 / max(self._ewma_task_s, 1e-5))))

    def _reclaim(self, count: int) -> None:
        """XAUTOCLAIM over the whole pending list, resuming the cursor between calls."""
        assert self.keys is not None
        k = self.keys
        for _ in range(100):
            res = self.retrying(lambda: self.r.xautoclaim(
                k.tasks, GROUP, self.worker_id, self.config.min_idle_ms,
                start_id=self._cursor, count=count))
            self._cursor = res[0]
            for entry_id, fields in res[1]:
                self._push(entry_id, fields, reclaimed=True)
            if self._buffer or self._cursor == "0-0":
                return

    def next_delivery(self, timeout_s: float) -> Delivery | None:
        deadline = time.monotonic() + timeout_s
        while True:
            while self._buffer:
                d = self._admit(self._buffer.popleft())
                if d is not None:
                    return d
            self.flush()  # results waiting in a batch are written before we wait for more
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._fill(min(remaining, self.renew_interval_s))

    def _drop(self, d: Delivery) -> None:
        with self._lock:
            self._in_hand.pop(d.token, None)

    def complete(self, delivery: Delivery, partial: Partial, meta: dict,
                 rows: bytes = b"") -> bool:
        """Queue the result+ack script; it is sent with the batch's others in one round trip
        when the batch is full, when the lease buffer is empty, or after 20 ms. Each script
        stays atomic (result and ack together); a crash before the flush loses no result,
        only the work (the chunks are still pending and are reclaimed)."""
        task_s = float(meta.get("task_s", 0.0))
        self._ewma_task_s = task_s if self._ewma_task_s is None else (
            0.8 * self._ewma_task_s + 0.2 * task_s)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append((delivery, encode_result(partial, **meta), task_s, rows))
        if (not self._buffer or len(self._pending) >= self.batch_size()
                or time.monotonic() - self._pending_since > 0.02):
            self.flush()
        return True

    def flush(self) -> None:
        if not self._pending:
            return
        assert self.keys is not None
        k, pending = self.keys, self._pending

        args: list = [GROUP]
        for d, result, task_s, rows in pending:
            args += [d.chunk, result, f"{task_s:.6f}", d.token, rows]
        won = self.retrying(lambda: self._complete_batch(
            keys=[k.results, k.stats, k.tasks, k.rows], args=args))
        if self.after_write is not None:
            self.after_write()
        for (d, *_), new in zip(pending, won, strict=True):
            self._drop(d)
            if not new:
                log.info("duplicate result ignored: first write kept", extra={"chunk": d.chunk})
        self._pending = []

    def fail(self, delivery: Delivery, error: str, task_s: float = 0.0) -> str:
        assert self.spec is not None and self.keys is not None
        k = self.keys
        d = delivery
        self.flush()
        self._drop(d)
        if policy.exhausted(self.spec, d.attempt):
            self.dead_letter(d.chunk, error, d.attempt, entry_id=d.token, task_s=task_s)
            return "dead"
        self.retrying(lambda: self._retry(
            keys=[k.tasks, k.stats, k.events],
            args=[GROUP, d.token, d.chunk, d.start, d.end, d.attempt + 1, error[:2000],
                  f"{task_s:.6f}", self.worker_id, f"{time.time():.6f}"]))
        return "retried"

    def release(self, delivery: Delivery) -> None:
        assert self.keys is not None
        d = delivery
        self._release(keys=[self.keys.tasks],
                      args=[GROUP, d.token, d.chunk, d.start, d.end, d.attempt])
        self._drop(d)

    def release_prefetched(self) -> None:
        """Hand back prefetched, unstarted chunks (graceful stop)."""
        self.flush()
        while self._buffer:
            d = self._buffer.popleft()
            self.release(d)

    def finished_for_me(self) -> bool:
        assert self.spec is not None and self.keys is not None
        k = self.keys
        done, dead, length, pending = self.batch(lambda p: (
            p.hlen(k.results), p.xlen(k.dlq), p.xlen(k.tasks), p.xpending(k.tasks, GROUP)))
        # A dead letter of a malformed extra message counts in `dead` too: never leave while
        # a chunk is still queued, or the fleet could all exit with it in the stream.
        return done + dead >= self.spec.chunks_total and length <= pending["pending"]

    def close(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - the chunks stay pending and are reclaimed
            log.warning("could not write %d result(s) at exit: %s", len(self._pending), exc)
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=2)
        super().close()

    def held_by(self, run_id: str, worker: str) -> list[int] | None:
        k = Keys(run_id)
        held = []
        for item in self.r.xpending_range(k.tasks, GROUP, "-", "+", 1000, consumername=worker):
            entry = self.r.xrange(k.tasks, item["message_id"], item["message_id"])
            if entry and "c" in entry[0][1]:
                held.append(int(entry[0][1]["c"]))
        return held
