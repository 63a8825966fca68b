"""Looking people up for decisions: the quick path for plain email addresses gives what the
full validation gives, and the row lookups used by the decision API name the same people as
the ORM lookups used everywhere else."""

from __future__ import annotations

import string
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from portal.models.customer import ExternalId
from portal.services import identity
from portal.services.accounts import AccountError, create_customer, normalize_email


def slow_email(raw: str) -> str:
    try:
        return normalize_email(raw)
    except AccountError:  # kept as typed, with the same folding (NFKC, case)
        return unicodedata.normalize("NFKC", raw).strip().lower()


ASCII_ADDRESS = st.builds(
    lambda local, domain, tld, pad: f"{pad}{local}@{domain}.{tld}{pad}",
    st.text(string.ascii_letters + string.digits + ".+-_'!#$%&*/=?^`{|}~", min_size=1,
            max_size=20),
    st.text(string.ascii_letters + string.digits + "-._", min_size=1, max_size=20),
    st.sampled_from(["com", "fr", "ORG", "example", "test", "xn--p1ai", "c0m", "1", "local"]),
    st.sampled_from(["", " ", "\t"]),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(ASCII_ADDRESS, st.text(max_size=30),
                 st.text(string.printable, max_size=30)))
def test_quick_email_path_equals_full_validation(raw):
    assert identity._email(raw) == slow_email(raw)


def test_quick_email_path_leaves_idna_and_quotes_to_validation():
    assert identity._email("Ann@XN--BCHER-KVA.com") == "ann@bücher.com"
    assert identity._email('"ann"@example.com') == slow_email('"ann"@example.com')
    assert identity._email(" Ann.B@Example.COM ") == "ann.b@example.com"


def test_people_rows_name_the_same_customers_as_the_orm_lookup(session):
    ann = create_customer(session, "ann@example.com", phone="+33612345678")
    bob = create_customer(session, "bob@example.com")
    old = create_customer(session, "old@example.com")
    session.add(ExternalId(customer_id=bob.id, namespace="crm", value="B-1"))
    session.flush()
    old.merged_into_id = ann.id  # merged records resolve to the survivor
    session.flush()
    refs = [{"email": "ANN@example.com"}, {"phone": "+33 6 12 34 56 78"}, {"id": bob.public_id},
            {"external_id": {"namespace": "crm", "value": "B-1"}}, {"email": "old@example.com"},
            {"email": "nobody@example.com"}, {"id": "cus_missing"}, {"email": "bob@example.com"}]
    orm = identity.resolve_many(session, refs)
    rows = identity.resolve_people(session, refs)
    assert [c.id if c else None for c in orm] == [r.id if r else None for r in rows]
    assert [r.id if r else None for r in rows] == [ann.id, ann.id, bob.id, bob.id, ann.id,
                                                   None, None, bob.id]
    assert rows[0].email == "ann@example.com" and rows[0].public_id == ann.public_id
