"""The Decider reuses a verdict for people of the same shape of facts. It must answer exactly
what decide() answers for each of them: every combination of facts, for every kind of topic,
in a random order, with each person's own evidence and contact point."""

from __future__ import annotations

import itertools
import random
from datetime import time, timedelta

import pytest

from portal.services.decisions import Decider, Facts, Pressure, decide, facts_shape
from tests.unit.test_decisions import ACCOUNT, AT, OFFERS, ORDERS, ev, topic

NEWSLETTER_ON = topic("newsletter", default=True)
TOPICS = [OFFERS, ACCOUNT, ORDERS, NEWSLETTER_ON, None]
PRESSURES = [Pressure(), Pressure(max_per_week=1, recent_sends=(AT - timedelta(hours=1),)),
             Pressure(quiet_start=time(12), quiet_end=time(15), timezone="UTC"),
             Pressure(quiet_start=time(1), quiet_end=time(2), timezone="UTC")]


def every_facts() -> list[Facts | None]:
    """Every combination of what decide() reads, each person with their own evidence ids and
    address, so a reused verdict carrying someone else's would show."""
    people: list[Facts | None] = [None]
    serial = itertools.count(1)
    for erased, suppressed, paused, off, choice, reachable, pressure, _twin in itertools.product(
            (False, True), (None, "hard_bounce"), (False, True), (False, True),
            (None, "granted", "pending", "withdrawn"), (False, True), PRESSURES, (1, 2)):
        n = next(serial)
        people.append(Facts(
            erased=erased, suppressed=suppressed,
            paused=ev("withdrawn", 10 * n + 1) if paused else None,
            channel_off=ev("withdrawn", 10 * n + 2) if off else None,
            choice=ev(choice, 10 * n + 3) if choice else None,
            contact={"email": f"p{n}@example.com"} if reachable else None,
            pressure=pressure))
    return people


@pytest.mark.parametrize("delivery", [True, False])
def test_the_decider_answers_what_decide_answers_for_everyone(delivery):
    questions = [(t, channel, facts) for t in TOPICS for channel in ("email", "postal")
                 for facts in every_facts()]
    random.Random(5).shuffle(questions)
    decider = Decider(AT, delivery=delivery)
    reused = 0
    for t, channel, facts in questions:
        if (facts is not None and t is not None
                and decider.known(t, channel, facts_shape(facts), facts.pressure) is not None):
            reused += 1
        assert decider.decide(t, channel, facts) == decide(t, channel, facts, AT,
                                                           delivery=delivery)
    # a twin of every person, for each real topic: two in five
    assert reused >= len(questions) // 3  # it did reuse verdicts, and they were right
