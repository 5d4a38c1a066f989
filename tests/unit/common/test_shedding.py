"""The load shedder (services/common/shedding.py)."""

from __future__ import annotations


def test_a_party_holds_at_most_its_share_of_the_places():
    from services.common.shedding import LoadShedder

    shedder = LoadShedder("unit-shares", 8, party_share=0.25, party_of=lambda metadata: dict(metadata).get("t"))
    assert shedder.party((("t", "a"),)) == "a"
    assert shedder.enter("a") and shedder.enter("a")
    assert not shedder.enter("a"), "a third place is past a's share of 2"
    assert "'a' has 2 requests in flight" in shedder.refusal("a")
    assert all(shedder.enter(party) for party in ("b", "b", None, None, None, None))
    assert not shedder.enter("c") and "at capacity (8" in shedder.refusal("c"), "the whole bound still applies"
    shedder.release("a")
    assert shedder.enter("a"), "a released place can be taken again"
    for party in ("a", "a", "b", "b", None, None, None, None):
        shedder.release(party)
    assert shedder.in_flight == 0 and not shedder._held
