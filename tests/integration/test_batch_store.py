"""The batch store (services/gateway/batches/store.py) on SQLite and on a real PostgreSQL server: lines claimed by
racing replicas are each claimed once, a result is written once even after a lease ran out and the line was taken
over, cancels and expiries end what had not started, finalizing is taken by one replica, limits and tenants hold."""

from __future__ import annotations

import threading

import pytest

from services.admin.store import AdminStore
from services.gateway.batches.jsonl import InputLine
from services.gateway.batches.store import BatchStore, Refused, new_id


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def batches(url, clock):
    admin = AdminStore.open(url)  # brings the schema up
    yield BatchStore(admin.engine, clock)
    admin.close()


def _lines(count: int) -> list[InputLine]:
    return [InputLine(i + 1, f"req-{i}", "/v1/embeddings", "minilm", f'{{"model":"minilm","input":"t{i}"}}')
            for i in range(count)]


def _batch(store: BatchStore, tenant: str = "acme", count: int = 10, window_s: float = 3600.0) -> str:
    file_id = new_id("file")
    store.add_file(file_id, tenant, "batch", "in.jsonl", 100, count, max_files=None)
    return store.create_batch(tenant, "key_1", "/v1/embeddings", file_id, "1h", window_s, {"k": "v"},
                              _lines(count), max_in_flight=10)["id"]


def test_racing_replicas_claim_each_line_once(batches):
    batch_id = _batch(batches, count=60)
    claimed: dict[str, list[int]] = {}

    def replica(name: str) -> None:
        mine: list[int] = []
        while got := batches.claim(name, batch_id, 4, lease_s=60):
            mine += [c.line for c in got]
        claimed[name] = mine
    threads = [threading.Thread(target=replica, args=(f"r{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = sorted(line for lines in claimed.values() for line in lines)
    assert every == list(range(1, 61)), "each line claimed exactly once"
    assert batches.batch("acme", batch_id)["status"] == "in_progress"


def test_a_result_is_written_once_even_after_a_takeover(batches, clock):
    batch_id = _batch(batches, count=1)
    (first,) = batches.claim("slow", batch_id, 1, lease_s=5)
    assert batches.claim("other", batch_id, 1, lease_s=5) == [], "held under its lease"
    clock.now += 6  # the slow replica stalled past its lease
    (again,) = batches.claim("other", batch_id, 1, lease_s=5)
    assert again.line == first.line and again.attempts == 2
    assert not batches.finish("slow", batch_id, 1, "done", 200, {"late": True}, "r1"), "lost its lease"
    assert batches.finish("other", batch_id, 1, "done", 200, {"ok": True}, "r2")
    assert not batches.finish("other", batch_id, 1, "done", 200, {"twice": True}, "r3"), "one result only"
    (row,) = batches.ended_lines(batch_id)
    assert (row["state"], row["result"], row["request_id"]) == ("done", '{"ok": true}', "r2")


def test_a_renewed_lease_is_not_taken_over(batches, clock):
    batch_id = _batch(batches, count=1)
    batches.claim("alive", batch_id, 1, lease_s=5)
    clock.now += 4
    assert batches.renew("alive", lease_s=5) == 1
    clock.now += 4
    assert batches.claim("other", batch_id, 1, lease_s=5) == []


def test_a_released_line_waits_for_its_not_before(batches, clock):
    batch_id = _batch(batches, count=1)
    batches.claim("r", batch_id, 1, lease_s=5)
    assert batches.release("r", batch_id, 1, not_before=clock.now + 10)
    assert batches.claim("r", batch_id, 1, lease_s=5) == []
    clock.now += 11
    assert [c.line for c in batches.claim("r", batch_id, 1, lease_s=5)] == [1]


def test_lines_handed_back_by_a_clean_stop_are_claimable_at_once_and_not_counted(batches):
    batch_id = _batch(batches, count=3)
    assert [c.attempts for c in batches.claim("stopping", batch_id, 2, lease_s=60)] == [1, 1]
    assert batches.release_all("stopping") == 2
    assert batches.release_all("stopping") == 0, "nothing of its own is left running"
    again = batches.claim("other", batch_id, 3, lease_s=60)
    assert sorted((c.line, c.attempts) for c in again) == [(1, 1), (2, 1), (3, 1)]


def test_cancel_ends_what_did_not_start_and_waits_for_what_runs(batches, clock):
    batch_id = _batch(batches, count=5)
    running = batches.claim("r", batch_id, 2, lease_s=60)
    batches.finish("r", batch_id, running[0].line, "done", 200, {}, "x")
    assert batches.cancel("acme", batch_id)["status"] == "cancelling"
    assert batches.claim("r", batch_id, 5, lease_s=60) == [], "nothing more starts"
    assert batch_id in batches.to_finalize()
    assert not batches.begin_finalizing("f", batch_id, hold_s=30), "a line still runs"
    batches.finish("r", batch_id, running[1].line, "done", 200, {}, "y")
    assert batches.begin_finalizing("f", batch_id, hold_s=30)
    assert not batches.begin_finalizing("g", batch_id, hold_s=30), "one finalizer"
    states = [row["state"] for row in batches.ended_lines(batch_id)]
    assert states == ["done", "done", "cancelled", "cancelled", "cancelled"]
    assert batches.finish_batch("f", batch_id, {"output": ("file-" + "a" * 24, 10, 2)})
    done = batches.batch("acme", batch_id)
    assert (done["status"], done["output_file_id"], done["counts"]) == \
        ("cancelled", "file-" + "a" * 24, {"total": 5, "completed": 2, "failed": 0})
    assert batches.file("acme", "file-" + "a" * 24)["purpose"] == "batch_output"


def test_past_its_window_a_batch_expires_what_did_not_run(batches, clock):
    batch_id = _batch(batches, count=3, window_s=60)
    (line,) = batches.claim("r", batch_id, 1, lease_s=30)
    batches.finish("r", batch_id, line.line, "done", 200, {}, "x")
    clock.now += 61
    assert batches.claim("r", batch_id, 2, lease_s=30) == []
    assert batches.begin_finalizing("f", batch_id, hold_s=30)
    assert batches.finish_batch("f", batch_id, {})
    expired = batches.batch("acme", batch_id)
    assert expired["status"] == "expired" and expired["counts"] == {"total": 3, "completed": 1, "failed": 2}


def test_a_finalizer_that_died_is_replaced(batches, clock):
    batch_id = _batch(batches, count=1)
    (line,) = batches.claim("r", batch_id, 1, lease_s=30)
    batches.finish("r", batch_id, line.line, "done", 200, {}, "x")
    assert batches.begin_finalizing("dead", batch_id, hold_s=30)
    assert batch_id not in batches.to_finalize()
    clock.now += 31
    assert batch_id in batches.to_finalize()
    assert batches.begin_finalizing("next", batch_id, hold_s=30)
    assert not batches.finish_batch("dead", batch_id, {}), "the dead finalizer's late write is refused"
    assert batches.finish_batch("next", batch_id, {})
    assert batches.batch("acme", batch_id)["status"] == "completed"


def test_another_tenants_ids_are_not_found(batches):
    batch_id = _batch(batches, tenant="acme")
    assert batches.batch("globex", batch_id) is None
    assert batches.cancel("globex", batch_id) is None
    assert batches.batch("acme", batch_id)["status"] == "validating", "untouched by the other tenant's cancel"
    file_id = batches.batch("acme", batch_id)["input_file_id"]
    assert batches.file("globex", file_id) is None and not batches.delete_file("globex", file_id)
    assert batches.files("globex", None, 10, None) == ([], False)
    assert batches.batches("globex", 10, None) == ([], False)


def test_limits_refuse_with_nothing_written(batches):
    for _ in range(2):
        batches.add_file(new_id("file"), "acme", "batch", "f", 1, 1, max_files=2)
    with pytest.raises(Refused, match="holds 2 files"):
        batches.add_file(new_id("file"), "acme", "batch", "f", 1, 1, max_files=2)
    assert len(batches.files("acme", "batch", 10, None)[0]) == 2
    file_id = new_id("file")
    batches.add_file(file_id, "acme", "batch", "f", 1, 1, max_files=None)
    batches.create_batch("acme", "k", "/v1/embeddings", file_id, "1h", 3600, {}, _lines(2), max_in_flight=1)
    with pytest.raises(Refused, match="1 batches in flight"):
        batches.create_batch("acme", "k", "/v1/embeddings", file_id, "1h", 3600, {}, _lines(2), max_in_flight=1)
    assert len(batches.batches("acme", 10, None)[0]) == 1


def test_lists_page_newest_first(batches, clock):
    made = []
    for _ in range(5):
        clock.now += 1
        made.append(_batch(batches))
    first, more = batches.batches("acme", 2, None)
    assert [b["id"] for b in first] == made[::-1][:2] and more
    rest, more = batches.batches("acme", 10, first[-1]["id"])
    assert [b["id"] for b in rest] == made[::-1][2:] and not more
    with pytest.raises(Refused, match="not an id of this list"):
        batches.batches("acme", 10, "batch_nope")
