"""Reading request bodies in-process: the parser, the big-body reader, deep nesting, row limits.

tests/integration/test_intake.py sends the same kinds of bodies to a real server over sockets.
"""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework import protocol
from framework.serve import bigbody
from framework import config as cfgmod
from framework.errors import BadRequest, ConfigError, PayloadTooLarge


def nested(depth: int, leaf: bytes, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + leaf + b"]" * depth
    return b'{"a":' * depth + leaf + b"}" * depth


def test_max_rows_and_body_timeout_defaults_and_minimums(tmp_path):
    (tmp_path / "deploy.yaml").write_text("{}\n")
    cfg = cfgmod.load(tmp_path / "deploy.yaml")
    assert cfg.server["max_rows"] == 1_000_000
    assert cfg.server["body_timeout_seconds"] == 10
    for bad in ("max_rows: 0", "body_timeout_seconds: 0"):
        (tmp_path / "deploy.yaml").write_text(f"server: {{{bad}}}\n")
        with pytest.raises(ConfigError, match=bad.split(":")[0] + ": must be at least"):
            cfgmod.load(tmp_path / "deploy.yaml")


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("leaf", [b"1234567890123456789", b"1", b'"x"'])
def test_json_nested_over_a_thousand_levels_is_a_400(kind, leaf):
    # 19 digits in a row send the body through Python's json, which recursed into a 500.
    for depth in (1_100, 5_000, 100_000):
        for body in (b'{"data": ' + nested(depth, leaf, kind) + b"}",
                     b'{"data": [[1, ' + nested(depth, leaf, kind) + b"]]}"):
            with pytest.raises(BadRequest, match="nested too deeply"):
                protocol.parse(body)


def test_a_row_id_nested_deep_is_a_400_naming_the_row():
    body = b'{"data": [[' + nested(990, b"1", "list") + b', 1]]}'
    with pytest.raises(BadRequest, match="row 0 has an invalid id"):
        protocol.parse(body)


def test_max_rows_counts_batch_rows_only():
    body = orjson.dumps({"data": [[i, i] for i in range(4)]})
    assert len(protocol.parse(body, max_rows=4).ids) == 4
    with pytest.raises(PayloadTooLarge, match="4 rows, over the server's limit of 3"):
        protocol.parse(body, max_rows=3)
    assert not protocol.parse(orjson.dumps({"data": [1, 2, 3, 4]}), max_rows=1).batch


# Bodies as clients send them: orjson's compact form and the stdlib's spaced one, with
# strings that hold the cut's own text, nested rows, options after the rows, and errors.
cut_text = st.sampled_from(["],[", "], [", '"data"', "a", "", "[", "]"])


leaf = st.one_of(st.integers(-1000, 1000), st.floats(allow_nan=False), cut_text, st.booleans(), st.none(),
                 st.integers(-(2**70), 2**70))


value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


row = st.one_of(st.tuples(st.one_of(st.integers(-3, 30), cut_text, st.floats(-3, 3)), value).map(list),
                st.tuples(st.integers(0, 100), leaf).map(list), st.lists(value, max_size=3), value)


tail = st.sampled_from(["", ', "partial": true', ', "batch": false', ', "data": [[1, 1]]', ', "batch": 3',
                        ', "timeout_seconds": 5'])


def outcome(fn, body: bytes) -> tuple:
    try:
        call = fn(body, 40)
    except Exception as exc:  # the same class and message from both
        return (type(exc), str(exc))
    return (call.batch, call.data, call.ids, call.rows, call.partial, call.timeout,
            call.order is protocol.pair_order)


@settings(max_examples=400, deadline=None)
@given(rows=st.lists(row, max_size=50), spaced=st.booleans(), tail=tail,
       piece=st.integers(1, 64), broken=st.integers(0, 3))
def test_a_big_body_read_in_pieces_is_read_as_a_whole(rows, spaced, tail, piece, broken):
    text = json.dumps(rows) if spaced else json.dumps(rows, separators=(",", ":"))
    body = ('{"data": ' if spaced else '{"data":') + text + tail + "}"
    raw = body.encode()
    if broken == 1:
        raw = raw[:-1]  # truncated
    elif broken == 2:
        raw = raw.replace(b"],[", b"],,[", 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bigbody, "PIECE_BYTES", piece)  # many cuts in a small body
        assert outcome(bigbody.parse_large, raw) == outcome(protocol.parse, raw)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.one_of(st.integers(-50, 50), st.sampled_from(["a", "],[", "b"]),
                                         st.floats(-2, 2)), value).map(list),
                     min_size=2, max_size=60, unique_by=lambda r: r[0]),
       spaced=st.booleans(), tail=tail, piece=st.integers(1, 64))
def test_a_well_formed_batch_read_in_pieces_is_read_as_a_whole(rows, spaced, tail, piece):
    text = json.dumps(rows) if spaced else json.dumps(rows, separators=(",", ":"))
    raw = (('{"data": ' if spaced else '{"data":') + text + tail + "}").encode()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bigbody, "PIECE_BYTES", piece)
        assert outcome(bigbody.parse_large, raw) == outcome(protocol.parse, raw)


_SCANNED = [b"x", b"1,2", b'"data"', b'"', b"\\", b"u", b"\\u", *protocol._OPTION_NAMES]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(_SCANNED), max_size=40), scan=st.integers(1, 40))
def test_a_big_body_scanned_for_options_in_pieces_is_scanned_as_a_whole(parts, scan):
    """Whether a body names an option decides who parses it: an option name across a cut
    between two pieces must still be found."""
    raw = b"".join(parts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bigbody, "SCAN_BYTES", scan)
        assert asyncio.run(bigbody.only_data(raw)) == protocol.only_data(raw)


def test_an_option_anywhere_in_a_body_of_megabytes_is_found():
    rows = orjson.dumps({"data": [[i, i % 97] for i in range(300_000)]})
    assert len(rows) > 3 * bigbody.SCAN_BYTES
    assert asyncio.run(bigbody.only_data(rows))
    for tail in (b', "timeout_seconds": 1}', b', "\\u0070artial": true}', b', "response_format": "links"}'):
        body = rows[:-1] + tail
        assert not asyncio.run(bigbody.only_data(body)), tail
    at = bigbody.SCAN_BYTES - 4  # a name across the first cut (the scan reads bytes, not JSON)
    across = rows[:at] + b'"partial"' + rows[at:]
    assert protocol.only_data(across[:bigbody.SCAN_BYTES]) and protocol.only_data(across[bigbody.SCAN_BYTES:])
    assert not asyncio.run(bigbody.only_data(across))


def test_a_big_batch_is_cut_into_pieces_and_read_right():
    rows = [[i, [i, "],[", {"k": [i]}]] for i in range(60_000, 0, -1)]
    body = orjson.dumps({"data": rows, "partial": True})
    assert len(bigbody._cuts(body, len(b'{"data":[')) or []) > 4
    call = bigbody.parse_large(body, 100_000)
    assert call.batch and call.partial and call.data == rows and call.ids == [r[0] for r in rows]
    with pytest.raises(PayloadTooLarge, match="60000 rows"):
        bigbody.parse_large(body, 59_999)
    dup = orjson.dumps({"data": rows + [[7, 0]]})
    with pytest.raises(BadRequest, match="id 7 appears more than once"):
        bigbody.parse_large(dup, None)


def test_body_deadlines_cancel_only_reads_past_their_deadline():
    import asyncio

    from framework.serve.intake import BodyDeadlines

    async def main() -> None:
        deadlines = BodyDeadlines(0.05)
        never = asyncio.Event()

        async def stalled_read() -> bool:
            task = asyncio.current_task()
            deadlines.watch(task)
            try:
                await never.wait()
            except asyncio.CancelledError:
                return deadlines.done(task)
            return False

        async def finished_read() -> str:
            task = asyncio.current_task()
            deadlines.watch(task)
            assert deadlines.done(task) is False  # read at once: no longer watched
            await asyncio.sleep(0.3)  # several ticks past its deadline: still not cancelled
            return "ran on"

        late, prompt = asyncio.create_task(stalled_read()), asyncio.create_task(finished_read())
        assert await asyncio.wait_for(late, 30) is True
        assert await asyncio.wait_for(prompt, 30) == "ran on"
        assert not deadlines.reading and not deadlines.expired

    asyncio.run(main())


@pytest.mark.parametrize("body, expected", [
    (b'{"data": [[1, 10]]}', [1]),
    (b'{"data": [["a", 10]]}', ["a"]),
    (b'{"data": [[1.5, 10]]}', [1.5]),
    (b'{"data": [[1]]}', [1]),
    (b'{"data": [[true, 10]]}', "row 0 has an invalid id True"),
    (b'{"data": [[null, 10]]}', "row 0 has an invalid id None"),
    (b'{"data": [[[1], 10]]}', "row 0 has an invalid id [1]"),
    (b'{"data": [[{"a": 1}, 10]]}', "row 0 has an invalid id {'a': 1}"),
    (b'{"data": [[]]}', "row 0 must be a non-empty list"),
    (b'{"data": [5]}', None),
    (b'{"data": [[1, 10]], "batch": false}', None),
])
def test_a_one_row_batch_is_checked_as_any_batch(body, expected):
    """One row has a path of its own in `call_from`: the same answers as a batch of many."""
    for two in (False, True):  # the same row, alone and followed by a valid one
        doc = orjson.loads(body)
        if two:
            doc["data"].append(["other", 1])
        try:
            call = protocol.call_from(doc, max_rows=10)
        except BadRequest as exc:
            assert isinstance(expected, str) and expected in str(exc)
            continue
        if expected is None:
            assert not call.batch and call.data == doc["data"]
        else:
            assert call.batch and call.ids == expected + (["other"] if two else [])
            # ids of one type sort plainly; a string among numbers needs the pair order
            assert (call.order is protocol.pair_order) == (two and not isinstance(expected[0], str))


def test_a_one_row_batch_counts_against_max_rows():
    with pytest.raises(PayloadTooLarge, match="1 rows, over the server's limit of 0"):
        protocol.call_from(orjson.loads(b'{"data": [[1, 10]]}'), max_rows=0)
