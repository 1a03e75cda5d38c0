"""The systems file format: parse, write, and the errors an operator sees."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wavesync_proto.errors import LocalProtocolError
from wavesync_proto.mediator.systems import format_system_entry, parse_systems

SYSTEM = uuid.UUID("04f5a9ea-3cb8-44b0-bb62-401b420701de")
KEY = "k" * 16


def test_parse_two_systems() -> None:
    other = uuid.UUID(int=7)
    text = (
        format_system_entry(SYSTEM, KEY, "Main office")
        + "\n"
        + format_system_entry(other, "x" * 20)
    )
    assert parse_systems(text) == {SYSTEM: KEY, other: "x" * 20}


def test_an_empty_file_has_no_systems() -> None:
    assert parse_systems("") == {}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[system", "not valid TOML"),
        ("system = 3", "must be an array of tables"),
        ("system = [3]", "system #1: must be a table"),
        ('[[system]]\nid = "x"\nkey = "kkkkkkkkkkkkkkkk"', "'id' 'x' is not a UUID"),
        ("[[system]]\nid = 5", "'id' must be a UUID string"),
        (f'[[system]]\nid = "{SYSTEM}"\nkey = "short"', "at least 16 characters"),
        (f'[[system]]\nid = "{SYSTEM}"\nkey = "ключключключключ"', "ASCII"),
        (f'[[system]]\nid = "{SYSTEM}"\nkey = "{KEY}"\ncolour = 1', "unknown field(s) colour"),
        (
            f'[[system]]\nid = "{SYSTEM}"\nkey = "{KEY}"\n' * 2,
            "system #2: system 04f5a9ea-3cb8-44b0-bb62-401b420701de is listed twice",
        ),
    ],
)
def test_errors_say_what_and_where(text: str, error: str) -> None:
    with pytest.raises(LocalProtocolError, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_systems(text)


def test_format_refuses_keys_that_would_break_the_file() -> None:
    with pytest.raises(LocalProtocolError, match="printable ASCII"):
        format_system_entry(SYSTEM, 'quote"quote"quote"quote')


@pytest.mark.property
@given(
    system_id=st.uuids(),
    key=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"\\'),
        min_size=16,
        max_size=64,
    ),
    name=st.none()
    | st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40),
)
def test_written_entries_parse_back(system_id: uuid.UUID, key: str, name: str | None) -> None:
    assert parse_systems(format_system_entry(system_id, key, name)) == {system_id: key}
