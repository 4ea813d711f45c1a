"""The micro-batcher on a real engine (tiny BERT): fair passes across tenants, token budgets,
and failure isolation (a pass that raises fails only the request that caused it)."""

import asyncio

import pytest

from loradock.adapters.artifacts import files as artifacts
from loradock.adapters.artifacts.store import LocalStore
from loradock.adapters.core.base import BaseModel
from loradock.adapters.serving.engine import Engine
from loradock.adapters.serving.slots import AdapterRef
from loradock.adapters.tasks.classification import Classification
from loradock.service.batcher import MicroBatcher
from tests.adapters.test_slots import head, pool_for


@pytest.fixture(scope="module")
def engine(tiny_bert_dir, tmp_path_factory):
    base = BaseModel.load(tiny_bert_dir, device="cpu")
    store = LocalStore(tmp_path_factory.mktemp("store"))
    for i in range(2):
        files = artifacts.build_files(
            base=base, task=Classification(["x", "y", "z"]), head=head(i), weights=None,
            profile_texts=[], meta={},
        )  # fmt: skip
        store.publish(f"t/ad_{i}/v1", files)
    return Engine(base, pool_for(base, capacity=4), store)


def resident(engine, i):
    return engine.acquire(AdapterRef(f"ad_{i}", 1, key=f"t/ad_{i}/v1"))


class Recorder:
    """Wraps the real engine to record which requests' rows each pass held."""

    def __init__(self, engine):
        self.engine = engine
        self.passes = []

    def run_encoded(self, residents, ids):
        self.passes.append([len(row) for row in ids])
        return self.engine.run_encoded(residents, ids)


def run(coro):
    return asyncio.run(coro)


def test_a_small_request_of_another_tenant_joins_the_next_pass(engine):
    big_ids = engine.base.encode(["refund " * 200] * 64)  # 64 rows at the token limit (64)
    small_ids = engine.base.encode(["late"])
    rec = Recorder(engine)
    a, b = resident(engine, 0), resident(engine, 1)

    async def scenario():
        batcher = MicroBatcher(rec, max_batch=32, max_batch_tokens=256, max_wait_ms=0)
        batcher.start()
        order = []

        async def send(name, res, ids, tenant):
            out = await batcher.submit(res, ids, tenant)
            order.append((name, len(rec.passes)))
            return out

        big = asyncio.create_task(send("big", a, big_ids, "t1"))
        await asyncio.sleep(0)  # the big one is queued first
        small = asyncio.create_task(send("small", b, small_ids, "t2"))
        results = await asyncio.gather(big, small)
        await batcher.stop()
        return order, results, batcher

    order, (big_out, small_out), batcher = run(scenario())
    # Passes are cut at the token budget: 256 tokens / 64 per row = 4 rows, so 16+ passes.
    assert all(len(p) * max(p) <= 256 for p in rec.passes)
    assert len(rec.passes) >= 16
    # The small request ran in the first or second pass, not after the 16 passes of the big one.
    assert order[0][0] == "small"
    small_pass = next(i for i, p in enumerate(rec.passes) if min(p) < 64)
    assert small_pass <= 1
    assert len(big_out) == 64
    assert len(small_out) == 1
    # Row order is kept, and answers equal a direct run (up to float rounding: the row was
    # padded into a wider pass, which changes the matmul shapes, not the result).
    direct = engine.run_encoded([b], small_ids)[0].output
    assert small_out[0].output["label"] == direct["label"]
    assert small_out[0].output["scores"] == pytest.approx(direct["scores"], rel=1e-4, abs=1e-6)
    assert batcher.queued_rows == 0
    assert batcher.queued_tokens == 0


def test_requests_of_one_tenant_interleave_and_answers_keep_input_order(engine):
    texts = ["late", "refund " * 30, "thanks a lot", "why is my card charge so slow"]
    ids = engine.base.encode(texts)
    a = resident(engine, 0)
    want = [r.output for r in engine.run_encoded([a] * len(ids), ids)]

    async def scenario():
        batcher = MicroBatcher(engine, max_batch=2, max_batch_tokens=4096, max_wait_ms=1)
        batcher.start()
        outs = await asyncio.gather(*(batcher.submit(a, ids, "t") for _ in range(3)))
        await batcher.stop()
        return outs

    for out in run(scenario()):
        assert [r.output["label"] for r in out] == [w["label"] for w in want]
        assert [r.output["score"] for r in out] == pytest.approx([w["score"] for w in want])


def test_a_failing_request_does_not_fail_the_others_in_its_pass(engine):
    a, b = resident(engine, 0), resident(engine, 1)
    good = engine.base.encode(["refund please", "login error"])
    poison = [[2, 10**6, 3]]  # a token id outside the vocabulary: the embedding lookup raises

    async def scenario():
        batcher = MicroBatcher(engine, max_batch=32, max_batch_tokens=4096, max_wait_ms=50)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(a, good, "good")) for _ in range(5)]
        tasks.insert(2, asyncio.create_task(batcher.submit(b, poison, "bad")))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results, batcher

    results, batcher = run(scenario())
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(failed) == 1
    assert results[2] is failed[0]
    assert all(len(r) == 2 for r in results if not isinstance(r, Exception))
    assert batcher.stats.isolated_failures == 1  # they did share a pass, which raised


def test_admission_is_counted_in_tokens(engine):
    a = resident(engine, 0)
    ids = engine.base.encode(["refund " * 200] * 4)

    async def scenario():
        batcher = MicroBatcher(engine, max_batch=32, max_batch_tokens=4096, max_wait_ms=0,
                               max_queue_wait_ms=1)  # fmt: skip
        batcher.start()
        await batcher.submit(a, ids, "t")  # measures throughput
        rate = batcher.tokens_per_second
        # with its tokens queued, the tenant's next request is over the 1 ms wait limit
        batcher.max_wait = 0.5
        first = asyncio.create_task(batcher.submit(a, ids, "t"))
        await asyncio.sleep(0)
        refused = batcher.over_wait_limit("t")
        other = batcher.over_wait_limit("another tenant")
        await first
        await batcher.stop()
        return rate, refused, other

    rate, refused, other = run(scenario())
    assert other is None  # a tenant with nothing queued waits at most one row of each other
    assert rate is not None
    assert rate > 0
    assert refused is not None
    assert refused.status == 429
    assert "tokens" in refused.detail
