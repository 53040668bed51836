"""Points and the JSON form their values are stored and sent in."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeforward.points import Point, Value, value_from_json, value_json

FINITE = st.floats(allow_nan=False, allow_infinity=False)
VALUES: st.SearchStrategy[Value] = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | FINITE
    | st.text()
    | st.tuples(FINITE, FINITE)
)


@settings(max_examples=2000)
@given(VALUES)
def test_value_json_is_compact_stdlib_json_and_round_trips(value: Value) -> None:
    text = value_json(value)
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    back = value_from_json(text)
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize(
    ("value", "text"),
    [(True, "true"), (7, "7"), (2.5, "2.5"), (1e20, "1e+20"), ("é\n", '"é\\n"'), ((175.3, -37.8), "[175.3,-37.8]")],
)
def test_value_json_examples(value: Value, text: str) -> None:
    assert value_json(value) == text


def test_values_stored_before_decode() -> None:
    # Buffers written by earlier versions spell some floats otherwise.
    assert value_from_json("1e20") == 1e20 and value_from_json("0.000015") == 1.5e-5
    assert value_from_json("[1,2]") == (1.0, 2.0)
    with pytest.raises(ValueError, match="not a pin value"):
        value_from_json("null")


def test_a_point_is_frozen_slotted_and_hashable() -> None:
    point = Point("pump", 1, 1_000, 2.5)
    assert point == Point("pump", 1, 1_000, 2.5) and len({point, Point("pump", 1, 1_000, 2.5)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.value = 3.0  # type: ignore[misc]
    assert not hasattr(point, "__dict__")
    assert repr(point) == "Point(device='pump', pin=1, ts_ms=1000, value=2.5)"
