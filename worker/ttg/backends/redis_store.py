"""Redis plumbing shared by the `redis` (Streams) and `static` backends.

Key layout for a run (one hash tag per run, so a run lives on one cluster slot):

    ttg:{RUN}:meta      hash    the JobSpec, submitted_at, enqueued
    ttg:{RUN}:tasks     stream  chunk messages {c, s, e, a[, err]}; group "workers"
    ttg:{RUN}:results   hash    chunk -> result JSON; HSETNX, so the first write wins
    ttg:{RUN}:rows      stream  {c: chunk, d: Arrow IPC rows}, added only by the winning
                                write; the controller deletes each entry once its rows are
                                durable in runs/<id>/ (so the broker holds only rows in transit)
    ttg:{RUN}:dlq       stream  dead letters {chunk, reason, attempts, worker, at[, raw]}
    ttg:{RUN}:stats     hash    executions, duplicates, reclaimed, retried, task_s
    ttg:{RUN}:workers   hash    worker id -> last heartbeat (epoch seconds)
    ttg:{RUN}:go        list    start tokens for static workers
    ttg:{RUN}:attempts  hash    chunk -> executions started (static: poison detection)
    ttg:{RUN}:events    stream  rare events (reclaimed, retried, dead_lettered, reconciled),
                                capped; completions are in `results`

Results and acks are written by one Lua script, so a chunk is never acked without its result
nor stored twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
import redis.exceptions as rex

from ttg.backends.backoff import Backoff
from ttg.backends.base import Backend, BrokerConfig, DeadLetter, Progress
from ttg.backends.tls import redis_kwargs, refusal, unreachable_hint
from ttg.errors import BrokerAuthError, BrokerUnavailable, JobMismatch
from ttg.partial import Partial, decode_result
from ttg.sweep import JobSpec, strict_float, strict_int

log = logging.getLogger("ttg.redis")
T = TypeVar("T")
GROUP = "workers"

# KEYS: results, stats, tasks, rows   ARGV: chunk, result, task_s, group, entry id ('' = no
# ack), rows
COMPLETE_LUA = """
local new = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if new == 1 then redis.call('XADD', KEYS[4], '*', 'c', ARGV[1], 'd', ARGV[6]) end
redis.call('HINCRBY', KEYS[2], 'executions', 1)
redis.call('HINCRBYFLOAT', KEYS[2], 'task_s', ARGV[3])
if new == 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', 1) end
if ARGV[5] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
  redis.call('XDEL', KEYS[3], ARGV[5])
end
return new
"""

EVENTS_MAXLEN = 100000

# KEYS: dlq, tasks, stats, events   ARGV: group, entry id ('' = none), chunk, reason, attempts,
#                                         worker, at, raw, task_s
DEAD_LUA = """
redis.call('XADD', KEYS[1], '*', 'chunk', ARGV[3], 'reason', ARGV[4], 'attempts', ARGV[5],
           'worker', ARGV[6], 'at', ARGV[7], 'raw', ARGV[8])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'ts', ARGV[7],
           'kind', 'dead_lettered', 'chunk', ARGV[3], 'worker', ARGV[6], 'reason', ARGV[4])
redis.call('HINCRBY', KEYS[3], 'dead_lettered', 1)
if tonumber(ARGV[9]) > 0 then
  redis.call('HINCRBY', KEYS[3], 'executions', 1)
  redis.call('HINCRBYFLOAT', KEYS[3], 'task_s', ARGV[9])
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
end
return 1
"""


# The same, for a batch of chunks in one call (fewer round trips and less client work):
# KEYS: results, stats, tasks, rows
# ARGV: group, then (chunk, result, task_s, entry id, rows) repeated
COMPLETE_BATCH_LUA = """
local won, dup, task_s = {}, 0, 0
for i = 2, #ARGV, 5 do
  local new = redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  task_s = task_s + tonumber(ARGV[i + 2])
  if new == 0 then dup = dup + 1 else
    redis.call('XADD', KEYS[4], '*', 'c', ARGV[i], 'd', ARGV[i + 4])
  end
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[i + 3])
  redis.call('XDEL', KEYS[3], ARGV[i + 3])
  won[#won + 1] = new
end
redis.call('HINCRBY', KEYS[2], 'executions', #won)
redis.call('HINCRBYFLOAT', KEYS[2], 'task_s', tostring(task_s))
if dup > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', dup) end
return won
"""

# KEYS: meta   ARGV: field, value, field, value...   -> 1 created, 0 existed
CREATE_META_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


def _opt(conv, value: object, default):  # noqa: ANN001, ANN202
    try:
        return conv(value)
    except ValueError:
        return default


def parse_dead_letter(f: dict) -> DeadLetter:
    """A dead-letter record {chunk, reason, attempts, worker, at[, raw]} as another process
    wrote it; unreadable numbers become chunk -1, attempts 0, at None (never an exception)."""
    return DeadLetter(
        chunk=_opt(strict_int, f.get("chunk", "-1"), -1),
        reason=str(f.get("reason", "")),
        attempts=max(_opt(strict_int, f.get("attempts") or "0", 0), 0),
        worker=str(f.get("worker") or "") or None,
        at=_opt(strict_float, f["at"], None) if f.get("at") else None,
        raw=str(f.get("raw") or "") or None,
    )


class Keys:
    def __init__(self, run_id: str) -> None:
        prefix = f"ttg:{{{run_id}}}:"
        self.meta = prefix + "meta"
        self.tasks = prefix + "tasks"
        self.results = prefix + "results"
        self.dlq = prefix + "dlq"
        self.stats = prefix + "stats"
        self.workers = prefix + "workers"
        self.go = prefix + "go"
        self.attempts = prefix + "attempts"
        self.events = prefix + "events"
        self.rows = prefix + "rows"
        self.fatal = prefix + "fatal"


def _is_auth_error(exc: Exception) -> bool:
    if isinstance(exc, rex.AuthenticationError):
        return True
    text = str(exc)
    return isinstance(exc, rex.ResponseError) and ("NOAUTH" in text or "WRONGPASS" in text)


def _redacted(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


class RedisStore(Backend):
    """Connection handling, job metadata, results, dead letters and stats."""

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__(config)
        tls = redis_kwargs(config.url, config.ca_file)
        self.r = redis.Redis.from_url(
            config.url,
            password=config.password or None,
            **tls,
            decode_responses=True,
            # bytes that are not UTF-8 (written by anyone) must reach the parsers as text,
            # not raise inside the client's reply parser where no message can be dead-lettered
            encoding_errors="backslashreplace",
            socket_connect_timeout=2,
            socket_timeout=30,
            socket_keepalive=True,
        )
        self._complete = self.r.register_script(COMPLETE_LUA)
        self._dead = self.r.register_script(DEAD_LUA)
        self._create = self.r.register_script(CREATE_META_LUA)
        self._complete_batch = self.r.register_script(COMPLETE_BATCH_LUA)
        # the rows stream carries bytes (Arrow IPC): read it without decoding responses
        self.rb = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
            config.url, password=config.password or None, decode_responses=False,
            socket_connect_timeout=2, socket_timeout=30, socket_keepalive=True, **tls))
        self.worker_id = "controller"
        self.keys: Keys | None = None
        self.spec: JobSpec | None = None

    # ---- connection -------------------------------------------------------------------
    def check(self) -> None:
        self.retrying(self.r.ping, budget_s=self.config.connect_timeout_s)

    def retrying(self, fn: Callable[[], T], budget_s: float | None = None) -> T:
        """Run `fn`, retrying connection errors with backoff for at most `budget_s`."""
        budget = self.config.retry_budget_s if budget_s is None else budget_s
        backoff = Backoff(budget)
        while True:
            try:
                return fn()
            except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError) as exc:
                if _is_auth_error(exc):
                    raise BrokerAuthError(
                        f"redis at {_redacted(self.config.url)} refused the password"
                    ) from exc
                tls = refusal(exc, f"redis at {_redacted(self.config.url)}", self.config.ca_file)
                if tls is not None:
                    raise tls from exc
                log.warning("broker unavailable, retrying in %.1fs: %s", backoff.delay, exc)
                if self.stop_requested() or not backoff.wait():
                    raise BrokerUnavailable(
                        f"redis at {_redacted(self.config.url)} unreachable after "
                        f"{budget:.0f}s: {exc}{unreachable_hint(self.config.url)}"
                    ) from exc
            except rex.ResponseError as exc:
                if _is_auth_error(exc):
                    raise BrokerAuthError(
                        f"redis at {_redacted(self.config.url)} needs a valid password: {exc}"
                    ) from exc
                raise

    def batch(self, build: Callable[[Any], None], transaction: bool = False) -> list:
        """Run the commands `build(pipe)` queues in one round trip, retried as a whole on a
        connection error (a pipeline is rebuilt for each try: a failed one is emptied)."""
        def run() -> list:
            pipe = self.r.pipeline(transaction=transaction)
            build(pipe)
            return pipe.execute()

        return self.retrying(run)

    def close(self) -> None:
        if self.keys is not None and self.worker_id != "controller":
            try:
                self.r.hdel(self.keys.workers, self.worker_id)
            except rex.RedisError:
                pass
        self.r.close()
        self.rb.close()

    # ---- job metadata -----------------------------------------------------------------
    def load_spec(self, run_id: str) -> JobSpec | None:
        meta = self.retrying(lambda: self.r.hgetall(Keys(run_id).meta))
        return JobSpec.from_fields(meta, run_id) if meta else None

    def _create_meta(self, spec: JobSpec) -> bool:
        """Store the spec; False if the same job exists already. JobMismatch if not same."""
        k = Keys(spec.run_id)
        fields = {**spec.to_fields(), "submitted_at": f"{time.time():.6f}"}
        flat = [x for kv in fields.items() for x in kv]
        created = self.retrying(lambda: self._create(keys=[k.meta], args=flat))
        if not created:
            existing = JobSpec.from_fields(self.retrying(lambda: self.r.hgetall(k.meta)))
            if not existing.same_job(spec):
                raise JobMismatch(
                    f"run {spec.run_id} exists with a different job ({existing}); "
                    "use a new run id"
                )
            return False
        return True

    def purge(self, run_id: str) -> None:
        k = Keys(run_id)
        self.retrying(lambda: self.r.delete(k.meta, k.tasks, k.results, k.dlq, k.stats,
                                            k.workers, k.go, k.attempts, k.events, k.rows,
                                            k.fatal))

    def broker_memory_bytes(self) -> int:
        """Redis' `used_memory` (INFO memory)."""
        return int(self.retrying(lambda: self.r.info("memory"))["used_memory"])

    def submitted_at(self, run_id: str) -> float | None:
        value = self.retrying(lambda: self.r.hget(Keys(run_id).meta, "submitted_at"))
        return float(value) if value else None

    # ---- results and dead letters -----------------------------------------------------
    def results(self, run_id: str) -> Iterator[tuple[int, Partial, dict]]:
        k = Keys(run_id)
        for field, raw in self._hscan(k.results):
            try:
                chunk = strict_int(field, "chunk")
                partial, meta = decode_result(raw)
            except ValueError as exc:  # never aggregated: the chunk shows as missing
                log.error("run %s: skipping result %r: %s", run_id, field[:40], exc)
                continue
            yield chunk, partial, meta

    def _hscan(self, key: str, count: int = 1000) -> Iterator[tuple[str, str]]:
        """A hash's fields page by page, within the retry budget: a broker that restarts while
        a run's results are read (broker-kill as the run ends) is waited for. A restarted
        Redis seeds its hash tables anew, so an old cursor means nothing there: the scan
        starts over and skips the fields it has already given."""
        seen: set[str] = set()
        cursor = 0
        while True:
            try:
                cursor, page = self.r.hscan(key, cursor, count=count)
            except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError):
                self.retrying(self.r.ping)  # the broker back (or BrokerUnavailable), then anew
                cursor = 0
                continue
            for field, raw in page.items():
                if field not in seen:
                    seen.add(field)
                    yield field, raw
            if cursor == 0:
                return

    def dead_letters(self, run_id: str) -> list[DeadLetter]:
        k = Keys(run_id)
        out: dict[int, DeadLetter] = {}
        for _id, f in self.retrying(lambda: self.r.xrange(k.dlq)):
            d = parse_dead_letter(f)
            out[d.chunk] = d
        return sorted(out.values(), key=lambda d: d.chunk)

    def event(self, kind: str, **fields: object) -> None:
        """Record a rare event (never per completed chunk: those are the results)."""
        if self.keys is None:
            return
        data = {"ts": f"{time.time():.6f}", "kind": kind, "worker": self.worker_id,
                **{k: str(v) for k, v in fields.items()}}
        self.retrying(lambda: self.r.xadd(self.keys.events, data, maxlen=EVENTS_MAXLEN,
                                          approximate=True))

    def events(self, run_id: str) -> list[dict]:
        out = []
        for _id, f in self.retrying(lambda: self.r.xrange(Keys(run_id).events)):
            try:
                f["ts"] = strict_float(f.get("ts"), "ts")
                f["kind"] = str(f["kind"])
            except (KeyError, ValueError):
                log.error("run %s: skipping malformed event %s", run_id, repr(f)[:200])
                continue
            if "chunk" in f:
                try:
                    f["chunk"] = strict_int(f["chunk"], "chunk")
                except ValueError:
                    pass
            out.append(f)
        return out

    def base_progress(self, run_id: str, spec: JobSpec) -> Progress:
        k = Keys(run_id)
        done, dead, stats, beats = self.batch(lambda p: (
            p.hlen(k.results), p.xlen(k.dlq), p.hgetall(k.stats), p.hvals(k.workers)))
        now = time.time()
        horizon = 3 * max(self.config.min_idle_ms / 3000.0, 0.5)
        return Progress(
            chunks_total=spec.chunks_total,
            done=done,
            dead=dead,
            executions=int(float(stats.get("executions", 0))),
            duplicates=int(float(stats.get("duplicates", 0))),
            reclaimed=int(float(stats.get("reclaimed", 0))),
            retried=int(float(stats.get("retried", 0))),
            task_s=float(stats.get("task_s", 0.0)),
            workers_alive=sum(1 for b in beats if now - float(b) <= horizon),
        )

    def heartbeat(self) -> None:
        if self.keys is not None:
            self.r.hset(self.keys.workers, self.worker_id, f"{time.time():.3f}")

    def dead_letter(
        self,
        chunk: int,
        reason: str,
        attempts: int,
        entry_id: str = "",
        raw: str = "",
        task_s: float = 0.0,
    ) -> None:
        assert self.keys is not None
        k = self.keys
        self.retrying(
            lambda: self._dead(
                keys=[k.dlq, k.tasks, k.stats, k.events],
                args=[GROUP, entry_id, chunk, reason[:2000], attempts, self.worker_id,
                      f"{time.time():.3f}", raw[:2000], f"{task_s:.6f}"],
            )
        )

    def store_result(self, chunk: int, result: str, task_s: float, entry_id: str = "",
                     rows: bytes = b"") -> bool:
        assert self.keys is not None
        k = self.keys
        new = self.retrying(
            lambda: self._complete(
                keys=[k.results, k.stats, k.tasks, k.rows],
                args=[chunk, result, f"{task_s:.6f}", GROUP, entry_id, rows],
            )
        )
        return bool(new)

    # ---- rows in transit (controller) ---------------------------------------------------
    def take_rows(self, run_id: str, limit: int = 200) -> list[tuple[Any, int, bytes]]:
        """Up to `limit` chunks' rows not yet dropped, oldest first: (token, chunk, rows)."""
        k = Keys(run_id)
        entries = self.retrying(lambda: self.rb.xrange(k.rows, count=limit))
        out = []
        for entry_id, fields in entries:
            try:
                chunk = int(fields.get(b"c", b"-1"))
            except ValueError:
                chunk = -1
            out.append((entry_id, chunk, fields.get(b"d", b"")))
        return out

    def drop_rows(self, run_id: str, tokens: list[Any]) -> None:
        """Delete rows that are now durable elsewhere."""
        if tokens:
            k = Keys(run_id)
            self.retrying(lambda: self.rb.xdel(k.rows, *tokens))

    def report_fatal(self, error: str) -> None:
        """A worker that cannot run the job says why, for the controller to stop at once."""
        if self.keys is not None:
            self.retrying(lambda: self.r.hset(self.keys.fatal, self.worker_id, error[:2000]),
                          budget_s=self.config.connect_timeout_s)

    def worker_errors(self, run_id: str) -> dict[str, str]:
        return self.retrying(lambda: self.r.hgetall(Keys(run_id).fatal))
