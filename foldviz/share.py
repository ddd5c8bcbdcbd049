"""Shareable app state: the model, the evaluation data and the plan packed into one URL-safe string.

The app keeps this string in its URL (``?s=...``) so that a reload or a shared link opens the same model with the
same plan. Decoding is a checking layer: the string is untrusted input (anyone can edit a URL), so its length, the
decompressed size, the JSON shape and every field's type are checked before anything is used; the plan itself is
validated later by :meth:`foldviz.session.Workbench.plan_from` like any imported plan.

Format: ``base64url(zlib(JSON))`` without padding, JSON ``{"v": 1, "model": {...}, "data": {...}, "plan": {...}}``.
"""
from __future__ import annotations

import base64
import binascii
import json
import zlib

__all__ = ["STATE_VERSION", "MAX_STATE_CHARS", "MAX_STATE_JSON_BYTES", "StateError", "encode_state", "decode_state"]

STATE_VERSION = 1
#: longest accepted ``s`` parameter (browsers keep URLs of ~32k characters; a 100-override plan packs to ~2k)
MAX_STATE_CHARS = 16_384
#: largest accepted decompressed JSON (guards against a zlib bomb in a hand-made link)
MAX_STATE_JSON_BYTES = 256 * 1024

_MODEL_KEYS = {"spec": str, "num_classes": (int, type(None)), "cifar_stem": bool, "upload": (str, type(None))}
_DATA_KEYS = {"spec": (str, type(None)), "limit": (int, type(None)), "repair_samples": int,
              "calib": (str, type(None))}


class StateError(ValueError):
    """A shared-state string that cannot be used (the message is one line, fit for the page)."""


#: bounds a link's numbers must meet before anything they imply is built (a class count sizes a classifier)
LIMITS = {"num_classes": 100_000, "limit": 1_000_000, "repair_samples": 100_000}


def encode_state(model: dict, data: dict | None, plan: dict | None) -> str:
    """Pack the session's model source, data source and plan (plain dicts) into a URL-safe string.

    An uploaded checkpoint cannot travel in a link: only its file name does (``model["upload"]``), so that the
    page can say which file to upload again.
    """
    m = {"spec": model["spec"], "num_classes": model.get("num_classes"), "cifar_stem": bool(model.get("cifar_stem")),
         "upload": model.get("weights_name") or (model.get("weights") and "checkpoint") or None}
    state = {"v": STATE_VERSION, "model": m, "data": data, "plan": plan}
    raw = json.dumps(state, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode("ascii").rstrip("=")


def _check_fields(d, spec: dict, what: str) -> dict:
    if not isinstance(d, dict):
        raise StateError(f"its {what} is not an object")
    unknown = set(d) - set(spec)
    if unknown:
        raise StateError(f"its {what} has unknown field(s) {', '.join(sorted(map(str, unknown)))[:80]}")
    for k, types in spec.items():
        ts = types if isinstance(types, tuple) else (types,)
        v = d.get(k)
        if k in d and (not isinstance(v, ts) or (isinstance(v, bool) and bool not in ts)):  # true is not a count
            raise StateError(f"its {what} field {k!r} has the wrong type")
        if isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= LIMITS.get(k, 10_000_000):
            raise StateError(f"its {what} field {k!r} is out of range (1..{LIMITS.get(k, 10_000_000):,})")
    return d


def decode_state(text: str) -> dict:
    """Unpack :func:`encode_state`'s string; returns ``{"model", "data", "plan"}`` (data/plan may be None).

    Raises :class:`StateError` with a one-line reason for anything malformed, oversized or of the wrong shape.
    """
    if not isinstance(text, str) or not text:
        raise StateError("the link's state is empty")
    if len(text) > MAX_STATE_CHARS:
        raise StateError(f"the link's state is {len(text)} characters; the limit is {MAX_STATE_CHARS}")
    try:
        packed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        z = zlib.decompressobj()
        raw = z.decompress(packed, MAX_STATE_JSON_BYTES + 1)
        if len(raw) > MAX_STATE_JSON_BYTES or z.unconsumed_tail:
            raise StateError(f"the link's state unpacks to more than {MAX_STATE_JSON_BYTES // 1024} KiB")
        state = json.loads(raw.decode("utf-8"))
    except StateError:
        raise
    except (binascii.Error, ValueError, zlib.error, UnicodeDecodeError):
        raise StateError("the link's state is not a foldviz state string (damaged or edited link?)") from None
    if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
        raise StateError(f"the link's state is not version {STATE_VERSION} of the foldviz format")
    model = _check_fields(state.get("model"), _MODEL_KEYS, "model")
    if not model.get("spec", "").strip():
        raise StateError("the link names no model")
    data = state.get("data")
    if data is not None:
        _check_fields(data, _DATA_KEYS, "data")
    plan = state.get("plan")
    if plan is not None and not isinstance(plan, dict):
        raise StateError("its plan is not an object")
    return {"model": model, "data": data, "plan": plan}
