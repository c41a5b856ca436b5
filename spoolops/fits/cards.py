"""Header edits: request values -> keyword edits -> new header bytes.

Trusts nothing: ``values`` is untrusted JSON from a request.  ``parse_values``
maps the FitsStorage-compatible names (qa_state, raw_site, release, generic)
to ``[(KEYWORD, value or None)]`` and enforces the FITS keyword and value
rules before any file is read.  ``apply_edits`` works on the header's 80-byte
cards directly: only the edited cards change, every other card keeps its
exact bytes (astropy is used to build and to check cards, not to re-serialise
the header).  Keywords are upper-cased; a keyword that appears several times
is set at its first occurrence and deleted everywhere.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import time
import warnings
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from astropy.io import fits


def _fits():
    # astropy is imported on first use, not when the worker starts: importing
    # it touches $HOME/.astropy, which a hardened worker may not be able to write
    from astropy.io import fits
    return fits

from ..errors import BadRequest, OpFailed
from . import checksum as cks


class _Blank:
    """A card with no value (``KEYWORD =`` and blanks): what FitsStorage
    writes for a ``generic`` value of null (astropy's ``header[kw] = None``)."""

    def __repr__(self) -> str:
        return "BLANK"


BLANK = _Blank()
Value = str | int | float | bool | _Blank | None
Edit = tuple[str, Value]
CARD = 80
BLOCK = 2880
END_CARD = b"END".ljust(CARD)

_KEYWORD_RE = re.compile(r"^[A-Z0-9_-]{1,8}$")
# Structure of the HDU, checksums, tile compression, and cards whose meaning
# is not "KEYWORD = value": never set or deleted through a request.
_PROTECTED_RE = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|GROUPS|TFIELDS|TFORM\d+"
    r"|TBCOL\d+|TDIM\d+|THEAP|END|CHECKSUM|DATASUM|CONTINUE|COMMENT|HISTORY"
    r"|ZIMAGE|ZSIMPLE|ZTENSION|ZBITPIX|ZNAXIS\d*|ZTILE\d+|ZCMPTYPE|ZNAME\d+|ZVAL\d+"
    r"|ZMASKCMP|ZQUANTIZ|ZDITHER0|ZEXTEND|ZBLOCKED|ZPCOUNT|ZGCOUNT|ZHECKSUM|ZDATASUM)$")

QA_STATES = {
    "undefined": ("UNKNOWN", "UNKNOWN"), "pass": ("USABLE", "YES"),
    "usable": ("USABLE", "NO"), "fail": ("BAD", "NO"), "check": ("CHECK", "CHECK"),
}
_SITE_KEYWORDS = {"iq": "RAWIQ", "cc": "RAWCC", "bg": "RAWBG", "wv": "RAWWV"}
_SITE_LEVELS = {"iq": ("20", "70", "85"), "cc": ("50", "70", "80"),
                "bg": ("20", "50", "80"), "wv": ("20", "50", "80")}
_SITE_RE = re.compile(r"^(iq|cc|bg|wv)(\d\d|any)$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def check_keyword(key: object) -> str:
    if not isinstance(key, str):
        raise BadRequest("header keywords must be strings")
    kw = key.strip().upper()
    if not _KEYWORD_RE.match(kw):
        raise BadRequest(f"invalid FITS keyword {key!r}: 1-8 characters of A-Z 0-9 - _")
    if _PROTECTED_RE.match(kw):
        raise BadRequest(f"keyword {kw} describes the file's structure or checksum; "
                         "it cannot be set or deleted")
    return kw


def check_value(kw: str, value: object) -> Value:
    """A JSON value as a card value; ``None`` means delete."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2 ** 63) <= value < 2 ** 63:
            raise BadRequest(f"{kw}: integer out of the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest(f"{kw}: NaN and infinity cannot be stored in a card")
    elif isinstance(value, str):
        if any(not 32 <= ord(c) <= 126 for c in value):
            raise BadRequest(f"{kw}: value must be printable ASCII")
    else:
        raise BadRequest(f"{kw}: value must be a string, number, boolean or null")
    make_card(kw, value, "")   # raises BadRequest when it does not fit one card
    return value


VALUE_KEYS = ("qa_state", "raw_site", "release", "generic")


def parse_values(values: object, fitsstorage: bool = False) -> list[Edit]:
    """All edits a request's ``values`` asks for, validated, in a stable order.

    ``generic`` is ``{KEYWORD: value}`` or a list of ``[KEYWORD, value]``
    pairs (FitsStorage sends either): a pair list keeps its order, and a
    keyword given twice in it is refused.  ``raw_site`` is one token string
    (tokens may be separated by blanks or commas) or a list of them.

    ``fitsstorage``: FitsStorage's meanings (a request in their flat shape):
    a ``generic`` null writes the keyword with no value (``BLANK``) instead
    of deleting it, and ``release`` is any date ``time.strptime(v,
    "%Y-%m-%d")`` accepts (``2024-1-5``), written as given."""
    if not isinstance(values, dict) or not values:
        raise BadRequest("values must be a non-empty object")
    unknown = set(values) - set(VALUE_KEYS)
    if unknown:
        raise BadRequest(f"unknown values: {', '.join(sorted(map(str, unknown)))}")
    edits: dict[str, Value] = {}

    def put(kw: str, value: Value) -> None:
        if kw in edits and not same_value(edits[kw], value):
            raise BadRequest(f"{kw} is given two different values")
        edits[kw] = value

    if "qa_state" in values:
        qa = values["qa_state"]
        pair = QA_STATES.get(qa.strip().lower()) if isinstance(qa, str) else None
        if pair is None:
            raise BadRequest(f"qa_state must be one of {', '.join(s.title() for s in QA_STATES)}")
        put("RAWGEMQA", pair[0])
        put("RAWPIREQ", pair[1])
    if "raw_site" in values:
        for kw, value in _parse_site(values["raw_site"]):
            put(kw, value)
    if "release" in values:
        put("RELEASE", _parse_release(values["release"], fitsstorage))
    if "generic" in values:
        for kw, value in generic_pairs(values["generic"]):
            put(kw, BLANK if value is None and fitsstorage else check_value(kw, value))
    return list(edits.items())


def generic_pairs(generic: object) -> list[tuple[str, Any]]:
    if generic == {} or generic == []:
        raise BadRequest("generic names no keyword")
    if isinstance(generic, dict):
        return [(check_keyword(key), value) for key, value in generic.items()]
    if not isinstance(generic, list):
        raise BadRequest("generic must be an object {KEYWORD: value} or a list of"
                         " [KEYWORD, value] pairs")
    pairs: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for item in generic:
        if not isinstance(item, list) or len(item) != 2:
            raise BadRequest("generic as a list must hold [KEYWORD, value] pairs")
        kw = check_keyword(item[0])
        if kw in seen:
            raise BadRequest(f"generic gives {kw} twice")
        seen.add(kw)
        pairs.append((kw, item[1]))
    return pairs


def _parse_site(raw: object) -> list[Edit]:
    items = raw if isinstance(raw, list) else [raw]
    tokens: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise BadRequest("raw_site must be a string or a list of strings")
        tokens += [t for t in re.split(r"[\s,]+", item.strip().lower()) if t]
    if not tokens:
        raise BadRequest("raw_site is empty")
    out = []
    for tok in tokens:
        m = _SITE_RE.match(tok)
        if not m or (m.group(2) != "any" and m.group(2) not in _SITE_LEVELS[m.group(1)]):
            raise BadRequest(f"raw_site {tok!r} is not one of iq20|70|85|any, "
                             "cc50|70|80|any, bg20|50|80|any, wv20|50|80|any")
        level = m.group(2)
        out.append((_SITE_KEYWORDS[m.group(1)],
                    "Any" if level == "any" else f"{level}-percentile"))
    return out


def _parse_release(raw: object, fitsstorage: bool = False) -> str:
    if fitsstorage and isinstance(raw, str) and any(not 32 <= ord(c) <= 126 for c in raw):
        raise BadRequest("release must be printable ASCII")
    if fitsstorage and isinstance(raw, str):
        try:
            time.strptime(raw, "%Y-%m-%d")     # FitsStorage's own check
        except ValueError:
            raise BadRequest(f"release is not a date YYYY-MM-DD: {raw!r}") from None
        return raw
    if not isinstance(raw, str) or not _DATE_RE.match(raw):
        raise BadRequest("release must be a date YYYY-MM-DD")
    try:
        _dt.date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"release is not a real date: {raw!r}") from None
    return raw


def same_value(old: Any, new: Any) -> bool:
    """Equal as FITS values: type matters (T is not 1), trailing blanks do not."""
    if new is BLANK or old is BLANK:
        return old is new
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool) and old == new
    if isinstance(old, str) and isinstance(new, str):
        return old.rstrip() == new.rstrip()
    if type(old) is not type(new):
        return False
    return old == new


def make_card(kw: str, value: Value, comment: str) -> bytes:
    """One 80-byte card; the comment is shortened if needed, the value never."""
    if value is BLANK:
        value = _fits().card.UNDEFINED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = _fits().Card(kw, value).image
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"{kw}: {exc}") from None
    if len(image) != CARD:
        raise BadRequest(f"{kw}: value does not fit in one 80-character card")
    if comment:
        # astropy's own layout when it fits (astropy re-serialises a CHECKSUM
        # card this way when verifying), else the comment is cut short.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = _fits().Card(kw, value, comment).image
        image = full if len(full) == CARD else (image.rstrip() + " / " + comment)[:CARD]
    return image.ljust(CARD).encode("ascii")


def _card_key(card: bytes) -> str:
    return card[:8].decode("ascii", "replace").rstrip()


def split_cards(header: bytes) -> list[bytes]:
    """The cards before END (header is whole blocks and contains END)."""
    cards = [header[i:i + CARD] for i in range(0, len(header), CARD)]
    for i, card in enumerate(cards):
        if card[:8] == b"END     ":
            return cards[:i]
    raise OpFailed("header has no END card")


def parse_header(header: bytes) -> fits.Header:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _fits().Header.fromstring(header.decode("ascii"))
    except Exception as exc:  # noqa: BLE001 - astropy raises many kinds on bad input
        raise OpFailed(f"header cannot be parsed: {exc}") from None


def header_value(hdr: fits.Header, kw: str) -> Any:
    """The current value, or a raw string if astropy cannot interpret it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = hdr[kw]
        except Exception:  # noqa: BLE001 - malformed card: report what is there
            return str(hdr.cards[kw].image[10:]).strip()
    if value is None or isinstance(value, _fits().card.Undefined):
        return None      # a card with no value (astropy reads it as None)
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def _drop_with_continues(cards: list[bytes], i: int) -> int:
    """Number of cards from ``i``: the card and any CONTINUE cards after it."""
    n = 1
    while i + n < len(cards) and cards[i + n][:8] == b"CONTINUE":
        n += 1
    return n


def apply_edits(header: bytes, edits: list[Edit],
                reject_new: bool | Collection[str] = False
                ) -> tuple[bytes, list[dict[str, Any]]]:
    """New header bytes and the list of changes; ``changes == []`` means no-op.

    ``reject_new``: True for every keyword, or the keywords it guards
    (FitsStorage's meaning: only those of ``generic``).  Raises ``Conflict``
    (via ``reject_new``) before building anything.
    """
    from ..errors import Conflict
    hdr = parse_header(header)
    cards = split_cards(header)
    changes = []
    for kw, value in edits:
        present = kw in hdr
        guarded = reject_new is True or (not isinstance(reject_new, bool) and kw in reject_new)
        if guarded and not present and value is not None:
            raise Conflict(f"{kw} is not in the header and reject_new is set")
        old = header_value(hdr, kw) if present else None
        if not present and value is None:
            continue
        if value is BLANK and present and old is None and \
                isinstance(hdr.cards[kw].value, _fits().card.Undefined):
            continue
        if present and value is not None and value is not BLANK and same_value(old, value):
            continue
        changes.append({"keyword": kw, "old": old, "new": None if value is BLANK else value})
        idx = [i for i, c in enumerate(cards) if _card_key(c) == kw]
        if value is None:
            for i in reversed(idx):
                del cards[i:i + _drop_with_continues(cards, i)]
            continue
        if idx:
            i = idx[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                comment = str(hdr.comments[kw]) if kw in hdr else ""
            cards[i:i + _drop_with_continues(cards, i)] = [make_card(kw, value, comment)]
        else:
            last = len(cards)
            while last and not cards[last - 1].strip():
                last -= 1
            if last < len(cards):
                cards[last] = make_card(kw, value, "")   # reuse a trailing blank card
            else:
                cards.append(make_card(kw, value, ""))
    if not changes:
        return header, []
    new = _assemble(cards)
    _verify(new, edits)
    return new, changes


def _assemble(cards: list[bytes]) -> bytes:
    body = b"".join(cards) + END_CARD
    return body + b" " * (-len(body) % BLOCK)


def stored_datasum(header: bytes) -> int | None:
    """The DATASUM card's value, or None when absent or unreadable."""
    for card in split_cards(header):
        if _card_key(card) == "DATASUM":
            try:
                return int(_fits().Card.fromstring(card.decode("ascii")).value)
            except (ValueError, TypeError):
                return None
    return None


def has_checksum(header: bytes) -> bool:
    return any(_card_key(c) == "CHECKSUM" for c in split_cards(header))


def seal(header: bytes, datasum: int) -> bytes:
    """Recompute the CHECKSUM card (if present) for ``datasum`` of the data unit."""
    cards = split_cards(header)
    idx = [i for i, c in enumerate(cards) if _card_key(c) == "CHECKSUM"]
    if not idx:
        return header
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    comment = f"HDU checksum updated {stamp}"
    cards[idx[0]] = make_card("CHECKSUM", cks.ZERO_CHECKSUM, comment)
    for i in reversed(idx[1:]):
        del cards[i]
    zeroed = _assemble(cards)
    value = cks.checksum_value(cks.sum32(zeroed), datasum)
    cards[idx[0]] = make_card("CHECKSUM", value, comment)
    return _assemble(cards)


def _verify(new: bytes, edits: list[Edit]) -> None:
    """The rewritten header must parse and carry exactly the requested values."""
    hdr = parse_header(new)
    for kw, value in edits:
        if value is BLANK:
            if kw not in hdr or header_value(hdr, kw) is not None:
                raise OpFailed(f"internal error: {kw} is not blank after the edit")
        elif value is None:
            if kw in hdr:
                raise OpFailed(f"internal error: {kw} still present after delete")
        elif kw not in hdr or not same_value(header_value(hdr, kw), value):
            raise OpFailed(f"internal error: {kw} did not round-trip")
