"""RetrievalLoss: logQ by hand, mixed negatives + memory + logQ against a per-row loop, and 2 gloo workers
(gathered negatives, unequal batch sizes, DDP) equal to 1 worker on the concatenated batch."""

from __future__ import annotations

import json
import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from rec_dist.losses.frequency import StreamingFrequency
from rec_dist.losses.retrieval import RetrievalLoss
from tests.test_frequency import sequential_gaps


def test_log_q_by_hand():
    """alpha = 1 keeps the last gap. Stream so far 2, 1, 1, 1 (positions 0-3); the batch [1, 2] takes
    positions 4, 5: item 1's gap is 1 (p = 1), item 2's is 5 (p = 0.2). Two stream columns: Q_1 = 2 * 1,
    Q_2 = 2 * 0.2; each is subtracted from its column's logit."""
    est = StreamingFrequency(4, alpha=1.0, hashed=False)
    est.update(torch.tensor([2, 1, 1, 1]))
    loss_fn = RetrievalLoss(temperature=0.5, frequency=est)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    got = loss_fn(q, v, torch.tensor([1, 2]))
    # logits q·v / 0.5 - log Q: row 0: (1.2 - ln 2, 0 - ln 0.4); row 1: (1.6 - ln 2, 2 - ln 0.4)
    row0 = [1.2 - math.log(2), 0.0 - math.log(0.4)]
    row1 = [1.6 - math.log(2), 2.0 - math.log(0.4)]
    want = (-(row0[0] - math.log(sum(map(math.exp, row0)))) - (row1[1] - math.log(sum(map(math.exp, row1))))) / 2
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert est.probability(torch.tensor([1, 2])).tolist() == pytest.approx([1.0, 0.2])


def naive_loss(q, batch, batch_ids, mixed, mixed_ids, memory, memory_ids, p, corpus_size, tau):
    """Per-row loop: columns = batch, mixed, memory; logit q·c / tau - log(n p_i + M / V); hits skipped."""
    columns = list(zip([*batch, *mixed, *memory], [*batch_ids, *mixed_ids, *memory_ids], strict=True))
    n_stream, n_uniform = len(batch) + len(memory), len(mixed)
    total = 0.0
    for b, query in enumerate(q):
        logits, positive = [], None
        for j, (vec, item) in enumerate(columns):
            if item == batch_ids[b] and j != b:
                continue  # accidental hit: the query's positive item in another column
            expected = n_stream * p[item] + (n_uniform / corpus_size if n_uniform else 0.0)
            logit = sum(x * y for x, y in zip(query, vec, strict=True)) / tau - math.log(expected)
            logits.append(logit)
            if j == b:
                positive = logit
        top = max(logits)
        total += -(positive - top - math.log(sum(math.exp(s - top) for s in logits)))
    return total / len(q)


def test_mixed_negatives_and_memory_against_a_loop():
    """Four steps; the loop keeps its own FIFO memory (size 7: wraps around) and its own frequency loop."""
    g = torch.Generator().manual_seed(0)
    est = StreamingFrequency(10, alpha=0.3, hashed=False)
    loss_fn = RetrievalLoss(temperature=0.2, frequency=est, memory_size=7)
    stream, memory = [], []
    for _ in range(4):
        q = F.normalize(torch.randn(5, 3, generator=g), dim=1)
        v = F.normalize(torch.randn(5, 3, generator=g), dim=1)
        ids = torch.randint(0, 10, (5,), generator=g)
        mixed = F.normalize(torch.randn(4, 3, generator=g), dim=1)
        mixed_ids = torch.randint(0, 10, (4,), generator=g)
        got = loss_fn(q, v, ids, (mixed, mixed_ids), corpus_size=10)
        stream += ids.tolist()
        _, gaps = sequential_gaps(stream, 0.3)
        p = {i: 1 / gaps[i] if i in gaps else 1 / len(stream) for i in range(10)}
        want = naive_loss(q.tolist(), v.tolist(), ids.tolist(), mixed.tolist(), mixed_ids.tolist(),
                          [m[0] for m in memory], [m[1] for m in memory], p, 10, 0.2)
        assert float(got) == pytest.approx(want, rel=1e-5)
        memory = (memory + list(zip(v.tolist(), ids.tolist(), strict=True)))[-7:]
    held_vectors, held_ids = loss_fn.memory.contents()
    assert sorted(held_ids.tolist()) == sorted(m[1] for m in memory)  # FIFO order inside is a ring buffer
    assert not held_vectors.requires_grad


def test_mixed_negatives_get_gradients_and_the_memory_does_not():
    g = torch.Generator().manual_seed(1)
    q, v = torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(4, 3, generator=g, requires_grad=True)
    mixed = torch.randn(3, 3, generator=g, requires_grad=True)
    loss_fn = RetrievalLoss(temperature=1.0, memory_size=8)
    loss_fn(q.detach(), v.detach(), torch.arange(4))  # fills the memory
    loss_fn(q, v, torch.arange(4), (mixed, torch.tensor([5, 6, 7])), corpus_size=10).backward()
    assert mixed.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    assert loss_fn.memory.filled == 8


# ---- two workers ---------------------------------------------------------------------------------------
STEPS, SIZES, NUM_ITEMS = 3, (5, 3), 6  # rank 0 holds 5 rows, rank 1 holds 3: unequal batches


class TinyTowers(nn.Module):
    """Query: a linear map of 3 features; item: an embedding table; both L2-normalised."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Linear(3, 4)
        self.item = nn.Embedding(NUM_ITEMS, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.query(x), dim=1), F.normalize(self.item(ids), dim=1)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    total = sum(SIZES)  # ids in [0, 6) over 8 rows: accidental hits across the two ranks
    return [(torch.randn(total, 3, generator=g), torch.randint(0, NUM_ITEMS, (total,), generator=g))
            for _ in range(STEPS)]


def new_loss(gather: bool = True) -> RetrievalLoss:
    return RetrievalLoss(0.1, StreamingFrequency(NUM_ITEMS, alpha=0.5, hashed=False), memory_size=10, gather=gather)


def run_steps(model: nn.Module, loss_fn: RetrievalLoss, rows: slice, reduce) -> dict:
    """SGD steps on ``rows`` of each global batch; ``reduce`` turns the local loss into the global one."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], []
    for x, ids in global_batches():
        query, item = model(x[rows], ids[rows])
        loss = loss_fn(query, item, ids[rows])
        opt.zero_grad()
        loss.backward()
        losses.append(reduce(loss.detach()))
        grads.append([p.grad.flatten().tolist() for p in model.parameters()])
        opt.step()
    return {"losses": losses, "grads": grads, "gap": loss_fn.frequency.gap.flatten().tolist(),
            "memory_ids": loss_fn.memory.contents()[1].tolist()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One gloo process (light imports: no torchrec in this module, so a worker starts in a few seconds)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))

    def mean_over_ranks(loss: torch.Tensor) -> float:
        dist.all_reduce(loss)
        return float(loss) / world

    results = {}
    for gather in (True, False):
        model = DistributedDataParallel(TinyTowers())  # averages gradients over the ranks, as in training
        run = run_steps(model, new_loss(gather), rows, mean_over_ranks)
        states = [None] * world
        dist.all_gather_object(states, (run["gap"], run["memory_ids"]))
        run["same_state_on_every_rank"] = states[0][0] == states[1][0]
        results[str(gather)] = run
    dist.barrier()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("negatives") / "results.json")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.spawn(_worker, args=(2, port, out), nprocs=2, join=False)
    deadline = time.monotonic() + 300  # a hung collective fails the test instead of the whole suite
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("2-worker run did not finish in 300 s")
    with open(out) as fh:
        return json.load(fh)


def test_two_workers_with_gathered_negatives_equal_one_worker(two_workers):
    """Same loss and same (DDP-averaged) gradients at every step, same frequency counters and memory."""
    one = run_steps(TinyTowers(), new_loss(), slice(None), float)
    two = two_workers["True"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for got, want in zip(two["grads"], one["grads"], strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6)
    assert two["gap"] == pytest.approx(one["gap"])
    assert two["memory_ids"] == one["memory_ids"]
    assert two["same_state_on_every_rank"]


def test_without_gathering_the_workers_see_fewer_negatives(two_workers):
    """The equality above is not automatic: each rank on its own rows gives another loss; the frequency
    counters are still global (every rank folds in the gathered ids)."""
    one = run_steps(TinyTowers(), new_loss(), slice(None), float)
    local = two_workers["False"]
    assert abs(local["losses"][0] - one["losses"][0]) > 1e-3
    assert local["gap"] == pytest.approx(one["gap"])
    assert local["same_state_on_every_rank"]
