"""The shared names: values as stored and sent stay plain strings; one id check."""

from __future__ import annotations

import json

from prefloop.names import BASE, CHOICES, AdapterState, Choice, PairKind, is_hex_id, new_id


def test_ids() -> None:
    assert is_hex_id(new_id()) and new_id() != new_id()
    assert is_hex_id("0123456789abcdef" * 2)
    for bad in ("0123456789ABCDEF" * 2, "a" * 31, "a" * 33, "g" * 32, "a" * 31 + "\n",
                "\udcff" * 32, None, 12, b"a" * 32):
        assert not is_hex_id(bad), bad


def test_names_are_the_strings_stored() -> None:
    assert BASE == "base"
    assert [s.value for s in AdapterState] == ["candidate", "champion", "retired", "rejected",
                                               "rolled_back"]
    assert (PairKind.SAMPLE, PairKind.DUEL) == ("sample", "duel")
    assert CHOICES == ("a", "b", "tie", "both_bad", "written")
    assert json.dumps([Choice.BOTH_BAD, PairKind.DUEL]) == '["both_bad", "duel"]'
    assert f"{AdapterState.ROLLED_BACK}" == "rolled_back"
