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


def test_the_api_and_the_page_name_the_same_choices_and_kinds() -> None:
    """The API's request and response types and the page's labels spell the choices and
    kinds out for their readers (OpenAPI, the Arena tab); they must be these names."""
    from typing import get_args

    from prefloop.app.api import PairResponse, VoteRequest
    from prefloop.app.arena import VOTE_LABELS

    [choices, _none] = get_args(VoteRequest.model_fields["choice"].annotation)
    assert get_args(choices) == CHOICES
    assert set(get_args(PairResponse.model_fields["kind"].annotation)) == set(PairKind)
    assert tuple(VOTE_LABELS) == CHOICES
