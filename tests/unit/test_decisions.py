"""The precedence table: every rule of services.decisions, and that each one beats the
rules after it. Read a row as: with these facts, the answer is this."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from portal.services.catalog import TopicInfo
from portal.services.decisions import RULES, Evidence, Facts, Pressure, decide

AT = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)  # a Monday, 14:00 in Paris


def topic(key: str = "offers", kind: str = "marketing", required: bool = False,
          channels: tuple[str, ...] = ("email", "sms"), default: bool = False) -> TopicInfo:
    return TopicInfo(key, kind, required, channels, {c: default for c in channels},
                     {"en": key}, {"en": ""}, {"en": "wording"}, 1, "h")


def ev(state: str, event_id: int = 1) -> Evidence:
    return Evidence(event_id, AT - timedelta(days=1), "portal", 1, state)


OFFERS = topic()
ACCOUNT = topic("account", "service", required=True, default=True)
ORDERS = topic("orders", "service", default=True)
EMAIL = {"email": "ann@example.com"}
GRANTED = ev("granted", 7)

# (case, topic, channel, facts, expected decision, expected reason)
TABLE = [
    ("unknown customer", OFFERS, "email", None, "deny", "unknown_customer"),
    ("unknown topic", None, "email", Facts(contact=EMAIL), "deny", "unknown_topic"),
    ("channel not offered", OFFERS, "postal", Facts(contact=EMAIL), "deny",
     "channel_not_offered"),
    ("erased beats suppression and consent", OFFERS, "email",
     Facts(erased=True, suppressed="complaint", choice=GRANTED, contact=EMAIL),
     "deny", "erased"),
    ("erased beats required service", ACCOUNT, "email", Facts(erased=True, contact=EMAIL),
     "deny", "erased"),
    ("suppression beats required service", ACCOUNT, "email",
     Facts(suppressed="hard_bounce", contact=EMAIL), "deny", "suppressed"),
    ("suppression beats consent", OFFERS, "email",
     Facts(suppressed="complaint", choice=GRANTED, contact=EMAIL), "deny", "suppressed"),
    ("required service beats pause and channel off", ACCOUNT, "email",
     Facts(paused=ev("withdrawn"), channel_off=ev("withdrawn"), contact=EMAIL),
     "send", "required_service"),
    ("pause beats channel switch and consent", OFFERS, "email",
     Facts(paused=ev("withdrawn", 3), channel_off=ev("withdrawn", 4), choice=GRANTED,
           contact=EMAIL), "deny", "marketing_paused"),
    ("pause does not touch service topics", ORDERS, "email",
     Facts(paused=ev("withdrawn"), contact=EMAIL), "send", "consented"),
    ("channel off beats consent", OFFERS, "email",
     Facts(channel_off=ev("withdrawn"), choice=GRANTED, contact=EMAIL), "deny", "channel_off"),
    ("channel off applies to non-required service topics", ORDERS, "email",
     Facts(channel_off=ev("withdrawn"), contact=EMAIL), "deny", "channel_off"),
    ("granted choice", OFFERS, "email", Facts(choice=GRANTED, contact=EMAIL), "send",
     "consented"),
    ("withdrawn choice beats a true default", ORDERS, "email",
     Facts(choice=ev("withdrawn"), contact=EMAIL), "deny", "withdrawn"),
    ("pending double opt-in is not consent", OFFERS, "email",
     Facts(choice=ev("pending"), contact=EMAIL), "deny", "pending_confirmation"),
    ("marketing default is not consented", OFFERS, "email", Facts(contact=EMAIL), "deny",
     "not_consented"),
    ("service default consented", ORDERS, "email", Facts(contact=EMAIL), "send", "consented"),
    ("no contact point", OFFERS, "sms", Facts(choice=GRANTED, contact=None), "deny",
     "no_contact_point"),
    ("consent is judged before the contact point", OFFERS, "sms", Facts(contact=None),
     "deny", "not_consented"),
    ("quiet hours defer", OFFERS, "email",
     Facts(choice=GRANTED, contact=EMAIL,
           pressure=Pressure(quiet_start=time(13, 0), quiet_end=time(15, 0),
                             timezone="Europe/Paris")), "defer", "quiet_hours"),
    ("weekly cap defers", OFFERS, "email",
     Facts(choice=GRANTED, contact=EMAIL,
           pressure=Pressure(max_per_week=2, recent_sends=(AT - timedelta(days=6),
                                                           AT - timedelta(days=1)))),
     "defer", "frequency_cap"),
    ("pressure does not apply to service messages", ORDERS, "email",
     Facts(contact=EMAIL, pressure=Pressure(max_per_week=1, recent_sends=(AT,),
                                            quiet_start=time(0, 0), quiet_end=time(23, 59))),
     "send", "consented"),
]


@pytest.mark.parametrize(("case", "topic_info", "channel", "facts", "decision", "reason"),
                         TABLE, ids=[row[0] for row in TABLE])
def test_precedence_table(case, topic_info, channel, facts, decision, reason):
    result = decide(topic_info, channel, facts, AT)
    assert (result.decision, result.reason) == (decision, reason)
    assert result.allowed is (decision == "send")


def test_every_rule_is_exercised_by_the_table():
    deciding_rules = set()
    for _, topic_info, channel, facts, _, _reason in TABLE:
        trace = decide(topic_info, channel, facts, AT).trace
        deciding_rules.add(next(rule for rule, outcome in reversed(trace) if outcome != "pass"))
    assert deciding_rules == set(RULES)


def test_evidence_points_at_the_deciding_event():
    result = decide(OFFERS, "email", Facts(channel_off=ev("withdrawn", 42), choice=GRANTED,
                                           contact=EMAIL), AT)
    assert result.evidence is not None and result.evidence.event_id == 42
    assert decide(OFFERS, "email", Facts(choice=GRANTED, contact=EMAIL),
                  AT).evidence == GRANTED


def test_trace_lists_rules_in_order_up_to_the_decider():
    trace = decide(OFFERS, "email", Facts(choice=ev("withdrawn"), contact=EMAIL), AT).trace
    names = [rule for rule, _ in trace]
    assert names == list(RULES[: RULES.index("choice") + 1])
    assert trace[-1] == ("choice", "withdrawn")


def test_quiet_hours_next_allowed_at_is_the_local_end_of_the_window():
    # 23:30 in Paris (21:30 UTC in summer); quiet 22:00-08:00 -> next morning 08:00 Paris.
    at = datetime(2026, 5, 4, 21, 30, tzinfo=UTC)
    facts = Facts(choice=GRANTED, contact=EMAIL, pressure=Pressure(
        quiet_start=time(22, 0), quiet_end=time(8, 0), timezone="Europe/Paris"))
    result = decide(OFFERS, "email", facts, at)
    assert result.decision == "defer"
    assert result.next_allowed_at == datetime(2026, 5, 5, 6, 0, tzinfo=UTC)


def test_outside_quiet_hours_sends():
    facts = Facts(choice=GRANTED, contact=EMAIL, pressure=Pressure(
        quiet_start=time(22, 0), quiet_end=time(8, 0), timezone="Europe/Paris"))
    assert decide(OFFERS, "email", facts, AT).decision == "send"


def test_cap_frees_up_when_the_oldest_send_leaves_the_week():
    sends = (AT - timedelta(days=6), AT - timedelta(days=3), AT - timedelta(hours=1))
    facts = Facts(choice=GRANTED, contact=EMAIL,
                  pressure=Pressure(max_per_week=3, recent_sends=sends))
    result = decide(OFFERS, "email", facts, AT)
    assert result.reason == "frequency_cap"
    assert result.next_allowed_at == sends[0] + timedelta(days=7)
    # Sends older than a week do not count.
    old = Facts(choice=GRANTED, contact=EMAIL, pressure=Pressure(
        max_per_week=1, recent_sends=(AT - timedelta(days=8),)))
    assert decide(OFFERS, "email", old, AT).decision == "send"


def test_cap_then_quiet_hours_combine_into_one_next_time():
    # The cap frees at 23:00 Paris, inside quiet hours: next allowed is 08:00 Paris.
    free_at = datetime(2026, 5, 4, 21, 0, tzinfo=UTC)
    facts = Facts(choice=GRANTED, contact=EMAIL, pressure=Pressure(
        max_per_week=1, recent_sends=(free_at - timedelta(days=7),),
        quiet_start=time(22, 0), quiet_end=time(8, 0), timezone="Europe/Paris"))
    result = decide(OFFERS, "email", facts, AT)
    assert result.reason == "frequency_cap"
    assert result.next_allowed_at == datetime(2026, 5, 5, 6, 0, tzinfo=UTC)


def test_matrix_mode_ignores_contact_points_and_pressure():
    facts = Facts(choice=GRANTED, contact=None, pressure=Pressure(max_per_week=1,
                                                                    recent_sends=(AT,)))
    assert decide(OFFERS, "sms", facts, AT, delivery=False).reason == "consented"
