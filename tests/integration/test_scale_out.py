"""Three replicas behind a prefix-aware router, on loopback (docs/scale-out.md).

Three servers of the embedded model publish KV-cache events; an indexer written from vLLM's
message schema (``vllm/distributed/kv_events.py``), not from stepserve's encoder, reads them, and
recomputes every block's hash from the event's tokens with vLLM's ``sha256_cbor`` chain
(``vllm/v1/core/kv_cache_utils.py``) under the replicas' PYTHONHASHSEED. A shared-prefix workload
goes out once round-robin and once to the replica the index names. The test asserts that the
stream is complete (consecutive sequence numbers from the core's ``AllBlocksCleared``) and
consistent (hashes recompute, a removed block was held, a parent is held when its child is
stored), that the index predicts each request's prefix-cache hits exactly, and that routing by
the index raises the hit rate. In production the endpoint picker routes; this router exists only
here. Requests go one at a time, so each is routed on an index that has seen every event before it.
"""

import hashlib
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cbor2
import httpx
import msgpack
import pytest
import zmq
from live_server import LiveServer, read_metric, start_server

pytestmark = pytest.mark.slow
SEED = "11"  # the replicas' PYTHONHASHSEED: NONE_HASH, the first block's parent, derives from it
BLOCK = 16
NUM_BLOCKS = 64  # one run's blocks fit a replica; the second run evicts some of the first's
REPLICAS = 3
PREFIXES, SUFFIXES = 6, 4  # per run: 6 system prompts, each with 4 user turns
PREFIX_BLOCKS, SUFFIX_TOKENS = 8, 24  # 128 shared tokens, then 1.5 blocks of the user's own
END_SEQ = (-1).to_bytes(8, "big", signed=True)

# vLLM's event structs, fields in declaration order. msgspec writes a tagged struct as
# ``[tag, *fields]`` (array_like, what stepserve and the vLLM releases llm-d reads use) or as a map
# with ``"type": tag`` (recent vLLM); newer releases append fields an older encoder leaves out.
EVENT_FIELDS = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
    ),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}
BATCH_FIELDS = ("ts", "events", "data_parallel_rank")


# -- vLLM's block hash, from its spec ------------------------------------------------------------


def sha256_cbor(obj) -> bytes:
    """vLLM's ``sha256_cbor``: SHA-256 of canonical CBOR."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


NONE_HASH = sha256_cbor(SEED)  # vLLM's init_none_hash with PYTHONHASHSEED set


def block_digest(parent: bytes | None, tokens: list[int]) -> bytes:
    """vLLM's ``hash_block_tokens``: (parent or NONE_HASH, token tuple, extra keys: none here)."""
    return sha256_cbor((parent or NONE_HASH, tuple(tokens), None))


def external(digest: bytes) -> int:
    """The hash as vLLM publishes it (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES): its low 64 bits."""
    return int.from_bytes(digest, "big") & ((1 << 64) - 1)


def prompt_hashes(tokens: list[int]) -> list[int]:
    """The published hashes of the prompt's full blocks."""
    out, parent = [], None
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        parent = block_digest(parent, tokens[start : start + BLOCK])
        out.append(external(parent))
    return out


# -- the subscriber ------------------------------------------------------------------------------


def decode_fields(raw, names: tuple[str, ...], tag: str | None = None) -> dict:
    """A msgspec struct, array-like (``[tag?, *values]``) or a map, as {field: value}."""
    if isinstance(raw, dict):
        return {k: v for k, v in raw.items() if k != "type"}
    values = raw[1:] if tag else raw
    return dict(zip(names, values))


def decode_batch(payload: bytes) -> list[tuple[str, dict]]:
    """A ``KVEventBatch`` as [(tag, fields), ...]."""
    batch = decode_fields(msgpack.unpackb(payload), BATCH_FIELDS)
    assert isinstance(batch["ts"], float) and batch.get("data_parallel_rank") in (None, 0)
    events = []
    for raw in batch["events"]:
        tag = raw["type"] if isinstance(raw, dict) else raw[0]
        events.append((tag, decode_fields(raw, EVENT_FIELDS[tag], tag)))
    return events


class Feed:
    """One replica's events: a SUB socket bound on its own loopback port (the replica connects, as
    to llm-d's indexer) and the replica's replay socket, which fills what PUB/SUB dropped (the
    batches sent before the subscription arrived, ZMQ's slow joiner)."""

    def __init__(self, context: zmq.Context, name: str, replay_endpoint: str) -> None:
        self.context, self.name, self.replay_endpoint = context, name, replay_endpoint
        self.topic = f"kv@127.0.0.1@{name}".encode()
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.endpoint = f"tcp://127.0.0.1:{self.sub.bind_to_random_port('tcp://127.0.0.1')}"
        self.payloads: dict[int, bytes] = {}  # every batch received, by sequence number
        self.next_seq = 0  # the first batch not yet handed to the index
        self.live = self.replays = 0  # batches that came over PUB/SUB; requests to the replay socket

    def config(self) -> str:
        return json.dumps(
            {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": self.endpoint,
                "replay_endpoint": self.replay_endpoint,
                "topic": self.topic.decode(),
            }
        )

    def take(self, replay: bool = False) -> list[list[tuple[str, dict]]]:
        """The batches from ``next_seq`` on, in order, with no gap: the live ones that arrived,
        and with ``replay`` (or on a gap) the replay socket's."""
        while self.sub.poll(0):
            topic, seq, payload = self.sub.recv_multipart()
            assert topic == self.topic
            self._keep(int.from_bytes(seq, "big"), payload)
            self.live += 1
        if replay or self._gap():
            self._replay()
        batches = []
        while self.next_seq in self.payloads:
            batches.append(decode_batch(self.payloads[self.next_seq]))
            self.next_seq += 1
        assert not self._gap(), f"{self.name}: batch {self.next_seq} is neither sent live nor replayed"
        return batches

    def _gap(self) -> bool:
        return self.next_seq not in self.payloads and any(seq > self.next_seq for seq in self.payloads)

    def _keep(self, seq: int, payload: bytes) -> None:
        assert self.payloads.setdefault(seq, payload) == payload, f"{self.name}: two batches {seq}"

    def _replay(self) -> None:
        self.replays += 1
        dealer = self.context.socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        try:
            dealer.send_multipart([b"", self.next_seq.to_bytes(8, "big")])
            while True:
                assert dealer.poll(10_000), f"{self.name}: the replay did not end"
                _, seq, payload = dealer.recv_multipart()
                if seq == END_SEQ:
                    return
                self._keep(int.from_bytes(seq, "big"), payload)
        finally:
            dealer.close(linger=0)


# -- the index and the router --------------------------------------------------------------------


@dataclass
class Index:
    """The blocks each replica holds, by published hash, checked event by event as it is built."""

    held: list[set[int]] = field(default_factory=lambda: [set() for _ in range(REPLICAS)])
    digests: dict[int, bytes] = field(default_factory=dict)  # published hash -> full digest, the next parent
    counts: dict[str, int] = field(default_factory=lambda: {"stored": 0, "removed": 0, "cleared": 0})

    def apply(self, replica: int, events: list[tuple[str, dict]]) -> None:
        for tag, fields in events:
            if tag == "BlockStored":
                self._stored(replica, fields)
            elif tag == "BlockRemoved":
                assert set(fields["block_hashes"]) <= self.held[replica], "removed a block it did not hold"
                self.held[replica] -= set(fields["block_hashes"])
                self.counts["removed"] += len(fields["block_hashes"])
            else:
                self.held[replica].clear()
                self.counts["cleared"] += 1

    def _stored(self, replica: int, f: dict) -> None:
        hashes, tokens, parent = f["block_hashes"], f["token_ids"], f["parent_block_hash"]
        assert f["block_size"] == BLOCK and len(tokens) == BLOCK * len(hashes)
        assert f.get("lora_id") is None and f.get("lora_name") is None and f.get("medium") in (None, "GPU")
        assert parent is None or parent in self.held[replica], "a block stored under a parent not held"
        digest = None if parent is None else self.digests[parent]
        for i, published in enumerate(hashes):
            digest = block_digest(digest, tokens[i * BLOCK : (i + 1) * BLOCK])
            assert external(digest) == published, "a published hash differs from the recomputation"
            assert published not in self.held[replica], "a held block stored again"
            self.digests[published] = digest
            self.held[replica].add(published)
        self.counts["stored"] += len(hashes)

    def cached_blocks(self, replica: int, hashes: list[int]) -> int:
        """Leading blocks of a prompt the replica holds."""
        n = 0
        while n < len(hashes) and hashes[n] in self.held[replica]:
            n += 1
        return n


def pick_prefix_aware(index: Index, hashes: list[int], sent: list[int]) -> int:
    """The replica holding the longest prefix; ties (and no hit anywhere) to the least used."""
    return max(range(REPLICAS), key=lambda r: (index.cached_blocks(r, hashes), -sent[r], -r))


def pick_round_robin(index: Index, hashes: list[int], sent: list[int]) -> int:
    return sum(sent) % REPLICAS


# -- the fixture and the workload ----------------------------------------------------------------


@dataclass
class Cluster:
    http: list[httpx.Client]
    feeds: list[Feed]
    index: Index
    model: str

    def apply_new(self, replay: bool = False) -> None:
        for r, feed in enumerate(self.feeds):
            for events in feed.take(replay):
                self.index.apply(r, events)

    def sync(self, until, timeout: float = 30.0) -> None:
        """Hand the replicas' new batches to the index until ``until()`` holds; after a quiet
        second, ask the replay sockets too (PUB/SUB drops what it sends before a subscription)."""
        poller = zmq.Poller()
        for feed in self.feeds:
            poller.register(feed.sub, zmq.POLLIN)
        quiet_since = time.monotonic()
        deadline = quiet_since + timeout
        while True:
            replay = time.monotonic() - quiet_since > 1.0
            self.apply_new(replay)
            if until():
                return
            assert time.monotonic() < deadline, "the replica's events did not arrive"
            if replay or poller.poll(100):
                quiet_since = time.monotonic()


def start_replicas(args: list[list[str]], home) -> list[LiveServer]:
    """Start the replicas side by side under one PYTHONHASHSEED (the children inherit it)."""
    with pytest.MonkeyPatch.context() as env, ThreadPoolExecutor(len(args)) as pool:
        env.setenv("PYTHONHASHSEED", SEED)
        starts = [pool.submit(start_server, a, home / f"replica-{i}.log") for i, a in enumerate(args)]
    servers = [s.result() for s in starts if s.exception() is None]
    errors = [s.exception() for s in starts if s.exception() is not None]
    if errors:
        for server in servers:
            server.stop()
        raise errors[0]
    return servers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("scale-out")
    context = zmq.Context()
    feeds = [Feed(context, f"replica-{r}", f"ipc://{home}/replay-{r}") for r in range(REPLICAS)]
    args = ["--max-model-len", "256", "--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK)]
    args += ["--num-scheduler-steps", "8", "--prefix-caching-hash-algo", "sha256_cbor"]
    args += ["--dtype", "float32", "--quantization", "none"]  # the quickest start on a CPU
    servers, clients = [], []
    try:
        servers = start_replicas([[*args, "--kv-events-config", f.config()] for f in feeds], home)
        clients = [httpx.Client(base_url=s.url, timeout=120) for s in servers]
        model = clients[0].get("/v1/models").json()["data"][0]["id"]
        cluster = Cluster(clients, feeds, Index(), model)
        for r, feed in enumerate(feeds):  # from sequence 0: the core's AllBlocksCleared
            batches = feed.take(replay=True)
            assert batches[0] == [("AllBlocksCleared", {})]
            for events in batches:
                cluster.index.apply(r, events)
        yield cluster
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()
        for feed in feeds:
            feed.sub.close(linger=0)
        context.term()


def workload(seed: int) -> list[list[int]]:
    """PREFIXES system prompts x SUFFIXES user turns as token ids, interleaved as users arrive."""
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]  # noqa: E731 - inside SmolLM2's vocabulary
    prefixes = [tokens(PREFIX_BLOCKS * BLOCK) for _ in range(PREFIXES)]
    prompts = [p + tokens(SUFFIX_TOKENS) for p in prefixes for _ in range(SUFFIXES)]
    rng.shuffle(prompts)
    return prompts


def metric(client: httpx.Client, name: str, model: str) -> float:
    return read_metric(client, f"stepserve:prefix_cache_{name}_total", model_name=model)


def send(cluster: Cluster, prompts: list[list[int]], pick) -> float:
    """Route and send each prompt in turn; each replica's hits must be what the index predicted.
    Returns the run's hit rate: prompt tokens found in the caches over prompt tokens."""
    before = [(metric(c, "hits", cluster.model), metric(c, "queries", cluster.model)) for c in cluster.http]
    sent = [0] * REPLICAS
    for prompt in prompts:
        hashes = prompt_hashes(prompt)
        r = pick(cluster.index, hashes, sent)
        sent[r] += 1
        # the last prompt token is always computed, so a hit stops a block short of a whole prompt
        predicted = BLOCK * cluster.index.cached_blocks(r, hashes[: (len(prompt) - 1) // BLOCK])
        client = cluster.http[r]
        hits = metric(client, "hits", cluster.model)
        response = client.post("/v1/completions", json={"model": cluster.model, "prompt": prompt, "max_tokens": 1})
        assert response.status_code == 200, response.text
        assert metric(client, "hits", cluster.model) - hits == predicted
        cluster.sync(lambda: set(hashes) <= cluster.index.held[r])
    after = [(metric(c, "hits", cluster.model), metric(c, "queries", cluster.model)) for c in cluster.http]
    hits = sum(a[0] - b[0] for a, b in zip(after, before))
    queries = sum(a[1] - b[1] for a, b in zip(after, before))
    assert queries == sum(len(p) for p in prompts)
    return hits / queries


def revisits(prompts: list[list[int]]) -> list[list[int]]:
    """One new user turn on each system prompt of ``prompts``."""
    prefixes = {tuple(p[: PREFIX_BLOCKS * BLOCK]): None for p in prompts}
    return [[*prefix, *range(7, 7 + SUFFIX_TOKENS)] for prefix in prefixes]


def test_prefix_aware_routing_raises_the_hit_rate(cluster):
    start = time.monotonic()
    first = workload(1)
    round_robin = send(cluster, first, pick_round_robin)
    prefix_aware = send(cluster, workload(2), pick_prefix_aware)  # other prefixes: no help from the first run
    # The first run's prefixes again, some of their blocks evicted by the second run: the index
    # must still predict every hit (send asserts it), so it saw each BlockRemoved.
    revisit = send(cluster, revisits(first), pick_prefix_aware)
    cluster.apply_new(replay=True)  # the last batches, replayed if PUB/SUB dropped them
    counts = cluster.index.counts
    ideal = (SUFFIXES - 1) * PREFIX_BLOCKS * BLOCK / (SUFFIXES * (PREFIX_BLOCKS * BLOCK + SUFFIX_TOKENS))
    print(
        f"\nprefix-cache hit rate over {REPLICAS} replicas, {PREFIXES} prefixes x {SUFFIXES} suffixes: "
        f"round-robin {round_robin:.3f}, prefix-aware {prefix_aware:.3f} (ideal {ideal:.3f}), "
        f"revisiting the first run's prefixes after evictions {revisit:.3f}; "
        f"events: {counts}; batches {[f.next_seq for f in cluster.feeds]}, live {[f.live for f in cluster.feeds]}, "
        f"replay requests {[f.replays for f in cluster.feeds]}; {time.monotonic() - start:.1f}s"
    )
    assert counts["removed"] > 0  # the second run evicted, so removals were checked
    assert all(f.live >= f.next_seq - 2 for f in cluster.feeds)  # replay filled only the slow joiner's start
    assert all(len(held) <= NUM_BLOCKS - 1 for held in cluster.index.held)  # no removal went unreported
    assert prefix_aware == pytest.approx(ideal)
    assert prefix_aware >= 1.5 * round_robin
