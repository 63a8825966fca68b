"""Field.quick skips building error paths for valid input; it must never accept what the full
check refuses, nor return anything else than the full check returns."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

from portal.api import operations
from portal.api.schema import SLOW, Field, FieldError, Obj
from portal.api.schemas import BatchRequest, DecisionRequest
from portal.models.catalog import CHANNELS

SCHEMAS: list[Obj] = [op.body for op in operations() if op.body is not None]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6)
    | st.text(max_size=8) | st.sampled_from([*CHANNELS, "newsletter", "a@b.c", "\x00"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["customer", "topic", "channel", "email", "id", "items",
                                       "explain", "at", "x"]), inner, max_size=4),
    max_leaves=12)

ITEM = st.fixed_dictionaries({
    "customer": st.one_of(st.fixed_dictionaries({"email": st.text(min_size=1, max_size=6)}),
                          st.fixed_dictionaries({"id": st.text(max_size=4)}),
                          st.dictionaries(st.sampled_from(["email", "phone", "x"]),
                                          st.text(max_size=3), max_size=2)),
    "topic": st.text(max_size=70), "channel": st.sampled_from([*CHANNELS, "fax"])})


def every_field_class(cls: type[Field] = Field) -> list[type[Field]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in every_field_class(child))]


@contextmanager
def without_quick() -> Iterator[None]:
    """The full check alone: every class's quick answers SLOW."""
    saved = {cls: cls.__dict__["quick"] for cls in every_field_class() if "quick" in cls.__dict__}
    for cls in saved:
        cls.quick = lambda self, value: SLOW  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, quick in saved.items():
            cls.quick = quick  # type: ignore[method-assign]


def full_check(schema: Obj, value: object) -> tuple[object, list[FieldError]]:
    errors: list[FieldError] = []
    with without_quick():
        full = schema.check(value, "", errors)
    return full, errors


def agree(schema: Obj, value: object) -> bool:
    """Whether quick took ``value``; if it did, the full check accepts it and returns the same."""
    full, errors = full_check(schema, value)
    quick = schema.quick(value)
    if quick is not SLOW:
        assert not errors, (value, errors)
        assert quick == full
    return quick is not SLOW


def valid(schema: Obj, value: object) -> bool:
    return not full_check(schema, value)[1]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(SCHEMAS), json_values)
def test_quick_never_disagrees_with_the_full_check(schema, value):
    """Any JSON against any body. Whether quick takes a value is not asserted here (it leaves
    dates, for one, to the full check): agree() asserts that what it takes, the full check
    accepts and returns alike."""
    agree(schema, value)


@settings(max_examples=300, deadline=None)
@given(st.lists(ITEM, min_size=1, max_size=5), st.booleans())
def test_quick_takes_well_formed_batches_and_leaves_faults_to_the_check(items, explain):
    """Decision shapes hold no field quick cannot judge: it takes exactly the valid ones."""
    batch = {"items": items, "explain": explain}
    assert agree(BatchRequest, batch) == valid(BatchRequest, batch), batch
    for item in items:
        assert agree(DecisionRequest, item) == valid(DecisionRequest, item), item


def test_quick_takes_the_common_shapes():
    item = {"customer": {"email": "ann@example.com"}, "topic": "offers", "channel": "email"}
    assert agree(DecisionRequest, item)
    assert agree(BatchRequest, {"items": [item] * 3})
    assert not agree(DecisionRequest, {**item, "extra": 1})
    assert not agree(DecisionRequest, {**item, "customer": {"email": "a", "id": "b"}})
