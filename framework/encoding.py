"""JSON encoding of results, for what data-science code returns.

orjson handles dataclasses, datetimes, numpy arrays and scalars natively
(NaN and infinities become null); `_default` covers the rest: pandas objects,
sets, numpy arrays orjson refuses (non-contiguous, object dtype), Decimals.
"""

from __future__ import annotations

import decimal
from typing import Any

import orjson

OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _default(obj: Any) -> Any:
    module = type(obj).__module__
    if module.startswith("pandas"):
        if hasattr(obj, "to_dict") and hasattr(obj, "columns"):
            return obj.to_dict(orient="records")
        if hasattr(obj, "isoformat"):
            return obj.isoformat()
        if hasattr(obj, "tolist"):
            return obj.tolist()
    if module == "numpy":
        if hasattr(obj, "tolist"):
            return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, decimal.Decimal):
        return float(obj)
    raise TypeError


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_default, option=OPTIONS)


def unencodable(value: Any) -> str | None:
    """None if `value` encodes, else the row error a caller sees."""
    try:
        dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        kind = type(value)
        why = f" ({exc})" if str(exc) else ""
        return (
            f"TypeError: result of type {kind.__module__}.{kind.__qualname__} is not "
            f"JSON-encodable{why}; return numbers (integers within 64 bits), strings, lists, "
            "dicts, numpy or pandas values"
        )
    return None
