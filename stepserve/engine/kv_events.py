"""KV-cache events over ZMQ, byte for byte as vLLM publishes them (docs/kv-events.md).

Each batch is one PUB message of three frames: the topic, an 8-byte big-endian sequence number
(0, 1, ... from the core's start) and the msgpack of vLLM's ``KVEventBatch``. vLLM encodes its
structs with msgspec, ``array_like=True`` and tagged events, so a batch is ``[ts, [event, ...],
data_parallel_rank]`` and an event is ``[tag, field, ...]`` with every field in declaration order
(``omit_defaults`` drops nothing from an array-like struct); ``BlockStored`` has the fields it had
once it carried ``lora_name`` (vllm-project/vllm#27577). msgpack-python writes the same bytes as
msgspec for the same values (float64 for ``ts``, the shortest integer forms, str8 for strings).
A thread owns the sockets, so a slow network never holds up the engine's step; the optional
ROUTER socket resends buffered batches from a sequence number a subscriber asks for.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import deque

import msgpack
import zmq

from stepserve.config import KVEventsConfig
from stepserve.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

log = logging.getLogger("stepserve.kv_events")

MEDIUM_GPU = "GPU"  # vLLM's medium of the engine's own KV cache (device tier "gpu" in llm-d), whatever the device
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # closes a replay
DATA_PARALLEL_RANK = 0  # one engine per server: vLLM's rank 0
_POLL_S = 0.1  # how long the thread waits for a batch before looking at the replay socket again


def event_fields(event: KVCacheEvent) -> list:
    """One event as vLLM's tagged, array-like struct: ``[tag, *fields]``."""
    if isinstance(event, BlockStored):
        return [
            "BlockStored",
            list(event.block_hashes),
            event.parent_block_hash,
            list(event.token_ids),
            event.block_size,
            event.lora_id,
            MEDIUM_GPU,
            event.lora_name,
        ]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", list(event.block_hashes), MEDIUM_GPU]
    if isinstance(event, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise TypeError(f"not a KV-cache event: {event!r}")


def encode_batch(ts: float, events: list[KVCacheEvent]) -> bytes:
    """The msgpack payload of one ``KVEventBatch``."""
    return msgpack.packb([float(ts), [event_fields(e) for e in events], DATA_PARALLEL_RANK], use_bin_type=True)


def pod_ip() -> str:
    """This pod's address: ``POD_IP`` (Kubernetes' downward API, as llm-d's charts set it), else the host's."""
    address = os.environ.get("POD_IP")
    if address:
        return address
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def default_topic(model: str) -> str:
    """``kv@<pod ip>@<model>``: the topic llm-d's indexer parses for the pod and the model."""
    return f"kv@{pod_ip()}@{model}"


def _binds(endpoint: str) -> bool:
    """vLLM's rule: bind a wildcard or local address, connect to any other (an indexer that binds)."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqEventPublisher:
    """A ``KVEventSink``: ``publish`` queues a step's events; the thread sends them in order."""

    def __init__(self, config: KVEventsConfig, topic: str) -> None:
        self._queue: queue.Queue[tuple[float, list[KVCacheEvent]] | None] = queue.Queue(config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)  # (seq, payload) for replay
        self._topic = topic.encode("utf-8")
        self._seq = 0
        # Made here so that a bad endpoint fails the engine's start; used only by the thread after.
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        (self._pub.bind if _binds(config.endpoint) else self._pub.connect)(config.endpoint)
        self._replay = None
        if config.replay_endpoint:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.bind(config.replay_endpoint)
        self._thread = threading.Thread(target=self._run, name="stepserve-kv-events", daemon=True)
        self._thread.start()
        log.info("publishing KV-cache events on %s, topic %r", config.endpoint, topic)

    def publish(self, events: list[KVCacheEvent]) -> None:
        self._queue.put((time.time(), events))  # blocks only when max_queue_size batches wait, as vLLM's does

    def shutdown(self, timeout: float = 2.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then close the sockets."""
        self._queue.put(None)
        self._thread.join(timeout)
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._context.term()

    def _run(self) -> None:
        while True:
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is None:
                return
            try:
                self._send(*item)
            except Exception:  # noqa: BLE001 - the thread outlives one bad batch
                log.exception("could not publish a batch of KV-cache events")

    def _send(self, ts: float, events: list[KVCacheEvent]) -> None:
        payload = encode_batch(ts, events)
        seq, self._seq = self._seq, self._seq + 1
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        self._buffer.append((seq, payload))

    def _serve_replay(self) -> None:
        """A request is ``[identity, b"", start_seq]``; the answer is every buffered batch from
        ``start_seq`` on as ``[identity, b"", seq, payload]``, then ``[identity, b"", -1, b""]``."""
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            log.warning("ignoring a replay request of %d frames (want 3: identity, empty, sequence)", len(frames))
            return
        identity, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                self._replay.send_multipart((identity, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((identity, b"", END_SEQ, b""))
