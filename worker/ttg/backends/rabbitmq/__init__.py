"""RabbitMQ backend: quorum work queue, retry tiers, dead-letter queue, results in a stream.

Topology of a run RUN (vhost from the URL, default exchange "" everywhere, so every publish
is addressed to a queue by name and `mandatory`, and every publish is confirmed; confirms are
tracked by sequence number (`Confirms`), so publishes are pipelined, not one round trip each):

    ttg.RUN.meta       stream   the job: a `spec` record (JobSpec + retry tiers + delivery
                                limit + submitted_at), then `enqueued` once every chunk is in.
                                Workers that start before submission consume it from `first`
                                and block until the spec arrives.
    ttg.RUN.tasks      quorum   one message per chunk, JSON {c, s, e, a[, err][, lost]}:
                                chunk, bounds, attempt, last error, losses carried over.
                                x-delivery-limit = max_attempts - 1, x-dead-letter-exchange ""
                                -> ttg.RUN.dlq with x-dead-letter-strategy at-least-once
                                (x-overflow reject-publish): a chunk that keeps killing its
                                worker is dead-lettered by the broker, never dropped.
    ttg.RUN.retry.N    quorum   retry tier N (default TTLs 1 s, 5 s, 25 s): a queue-level
                                x-message-ttl, dead-lettering (at-least-once) back to tasks.
                                A failed attempt k goes to tier min(k, tiers) - 1.
    ttg.RUN.dlq        quorum   dead letters: worker records {chunk, reason, attempts, worker,
                                at[, raw]} (max attempts reached, malformed message) and the
                                broker's delivery-limit dead letters (the task body + x-death).
    ttg.RUN.results    stream   the run's ledger: `results` records (a worker's batch of chunk
                                results, a JSON list), `result` records (one), first per chunk
                                wins at read time; `fail` records (failed attempts, with their
                                start time and the reclaimed flag), so executions and task time
                                count every attempt. Readable any number of times; `events()`
                                derives "reclaimed" (at the redelivered chunk's start) and
                                "retried" from it, "dead_lettered" from the DLQ.
    ttg.RUN.rows       quorum   a chunk's rows (Arrow IPC, header `chunk`), published with its
                                result and confirmed before the task's ack; the controller
                                takes them with basic.get and acks each once it is durable in
                                runs/<id>/ (duplicates of a redelivered chunk are dropped there)
    ttg.RUN.presence   classic  never published to; each worker consumes it, so its consumer
                                count is the number of live workers.

Worker: the connection lives on its own thread (`WorkerLink`: heartbeats keep flowing during a
long chunk); deliveries reach the main thread through a queue.Queue; operations go back with
`add_callback_threadsafe`. Results of consecutive chunks are batched (`Out`): a batch is
published as one stream record when it holds `batch_size()` results (about 20 ms of work), when
the worker has nothing else in hand, or 20 ms after its first result (so a result never waits
behind a long chunk); the link's thread acks the batch's deliveries (one `multiple` ack when they
are the oldest) only once that record is confirmed. The main thread does not wait for it while
it has work; a refused or lost batch is published again (PublishRejected / BrokerUnavailable
past the retry budget), its chunks unacked until then. Prefetch: the configured one, or
(prefetch 0 = auto) two batches' worth, applied by consuming again when the window is full
(nothing then in flight to be rejected). After a reconnect old delivery tags are dead: the
result is still published, the ack is skipped and the broker's redelivery is recognised and
acked without running it again.

Losses: a returned message carries `x-delivery-count`; a worker that takes a redelivered
(suspect) chunk runs it alone (consumer cancelled, other prefetched chunks handed back without
a return), so a chunk that kills its worker is charged for it and its neighbours are not.
`lost` in the body carries the count over a hand-back; attempt + lost > max_attempts is
dead-lettered by the worker, the broker's delivery limit being the backstop.

Controller: submits with PUBLISH_WINDOW publishes unconfirmed at a time (confirmed in
batches, refused ones published again); reads the streams to a marker it publishes itself (a
stream has no "end"), so reads are exact; the results stream is tailed by one long-lived
consumer between polls (acking as it reads: a stream consumer's credit). The dead-letter
queue is read with basic.get and handed back unacked (replay acks what it moves).
Retry tiers come from `options["retry_tiers_ms"]` or TTG_RABBITMQ_RETRY_TIERS_MS ("1000,5000,
25000") of the submitting process and are recorded with the job, so workers agree on them.
`progress().in_flight` is a conservative estimate: the chunks neither done,
dead nor ready in tasks/retry queues, counted as in flight while any worker is connected
(unacked messages only exist on a live connection); 0 when no worker is connected.

Layout of this package (pika's public API only: the blocking adapter on the controller's
thread, the asynchronous `SelectConnection` on a thread of its own where confirms are
pipelined):
    messages     names, topology, message formats, task-body parsing (no I/O)
    link         `Link`: a connection on its own thread, publisher confirms (`Confirms`)
    consumer     `WorkerLink`: the worker's link (consume, prefetch, acks, result batches)
    streams      `StreamReader` (a stream up to now), `wait_stream` (a worker awaiting the job)
    backend      `RabbitMQBackend`: what both sides share (connections, retries, streams)
    control      the controller side: submit, ledger, events, progress, rows
    deadletters  the dead-letter queue: read and replay
    work         the worker side: next delivery, complete, fail, hand back
    management   the broker's memory, from the management API (for `make bench`)
"""

from ttg.backends.rabbitmq.backend import RabbitMQBackend
from ttg.backends.rabbitmq.link import Batch, Confirms
from ttg.backends.rabbitmq.messages import (
    MalformedBody,
    Names,
    PublishRejected,
    Topology,
    _event,
    _header_int,
    parse_task_body,
)

__all__ = [
    "Batch",
    "Confirms",
    "MalformedBody",
    "Names",
    "PublishRejected",
    "RabbitMQBackend",
    "Topology",
    "_event",
    "_header_int",
    "parse_task_body",
]
