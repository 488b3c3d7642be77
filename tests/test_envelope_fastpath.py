"""decode()'s inline common-case path agrees with the general one (_from_array) on every
field of a v1 envelope set to every hostile value: accepted alike, or refused alike with the
same error type, field and message."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from mesh import envelope as env
from mesh.errors import CodecError

_BASE: list[Any] = [1, 0, "s.t", 7, "id-1", 1_700_000_000_000_000, "t.x", "src", None, None,
                    None, None, None, {}, b"payload"]
_HOSTILE: list[Any] = [True, False, None, 0, 1, -1, 2, 1.0, -1.5, "", "x", b"", b"x", [], [1],
                       {}, {"k": "v"}, {"k": 1}, {1: "v"}, 2**63, 2**64 - 1, -(2**63),
                       "\x00", "é"]


def _outcome(fn: Any, arg: Any) -> Any:
    try:
        ev = fn(arg)
    except CodecError as exc:
        return ("refused", type(exc), getattr(exc, "field", None), str(exc))
    return ("ok", ev)


@pytest.mark.parametrize("pos", range(len(_BASE)))
def test_the_fast_path_takes_and_refuses_exactly_what_from_array_does(pos: int) -> None:
    for value in _HOSTILE:
        arr = list(_BASE)
        arr[pos] = value
        buf = msgpack.packb(arr, use_bin_type=True)
        try:
            unpacked = msgpack.unpackb(buf)
        except ValueError:  # an int map key: refused by the unpack both paths share
            with pytest.raises(CodecError):
                env.decode(buf)
            continue
        general = _outcome(env._from_array, unpacked)
        assert _outcome(env.decode, buf) == general, (pos, value)


def test_the_fast_path_keeps_a_newer_minor_and_extras() -> None:
    arr = list(_BASE)
    arr[1] = 3
    ev = env.decode(msgpack.packb([*arr, {"future": 1}], use_bin_type=True))
    assert ev.version == (1, 3)
    assert dict(ev.extras) == {"future": 1}
    assert env.decode(msgpack.packb(_BASE, use_bin_type=True)).version == env.ENVELOPE_VERSION
