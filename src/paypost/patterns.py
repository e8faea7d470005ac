"""The EventBridge event-pattern language: compile, validate, match (DESIGN §2, "patterns").

Every arrow of the pipeline is a rule: an event pattern that routes events to a target. This
module implements Amazon EventBridge's pattern language with AWS's semantics, including its
validation errors, so a rule written for EventBridge behaves the same in paypost:

- exact values (string, number, true/false, null), a list of them meaning OR;
- ``prefix`` / ``suffix`` (plain or ``{"equals-ignore-case": ...}``), ``equals-ignore-case``,
  ``wildcard`` (``*``; ``\\*`` and ``\\\\`` escape), ``numeric`` comparisons and ranges,
  ``cidr`` (IPv4 and IPv6), ``exists``, ``anything-but`` (value, list, prefix, suffix,
  equals-ignore-case, wildcard), ``$or`` (nested too);
- nested objects; a dotted key (``"a.b"``) names the same field as nested keys ``a`` → ``b``,
  in the pattern and in the event (as AWS does);
- an event array matches if any element matches, and the fields a rule matches inside arrays
  of objects must come from the same array element (array consistency, as AWS does);
- numbers compare numerically (3 == 3.0) within AWS's domain: -5e9..5e9, 6 decimals.

Performance: a pattern is compiled once into a flat tuple of per-field matchers per ``$or``
branch, each with its path split and every dotted alternative precomputed, and a value test
specialised by JSON type (sets for exact values, closures for operators). Matching an event is
then a few dict lookups and calls per field; only events with arrays on a matched path (or keys
containing dots) take the exact, slower search.

Error messages carry AWS's reason text verbatim (``InvalidPattern.aws_message``) plus the JSON
path of the offending key or value.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, Final, Generic, TypeVar

__all__ = ["AWS_ERROR_PREFIX", "InvalidPattern", "Pattern", "PatternIndex", "compile", "matches"]

AWS_ERROR_PREFIX: Final = "Event pattern is not valid. Reason: "

# AWS's numeric domain: -5e9..5e9 inclusive, at most 6 decimal places.
_FIVE_BILLION: Final = 5_000_000_000
_MAX_DECIMALS: Final = 6

# Wildcard complexity: the most NFA states a single value may keep alive at once. AWS rejects
# patterns such as "*:*:*:*:*:event-bus/*" ("Rule is too complex") and accepts the usual
# one-or-two-wildcard ARN and path patterns; this bound reproduces that line.
_MAX_WILDCARD_COMPLEXITY: Final = 10

_RESERVED_IN_OR: Final = frozenset(
    {
        "exactly",
        "equals-ignore-case",
        "prefix",
        "suffix",
        "anything-but",
        "exists",
        "wildcard",
        "numeric",
        "cidr",
        "html",
        "=",
        "<",
        "<=",
        ">",
        ">=",
        "regex",
        "not-wildcard",
        "not-equals-ignore-case",
        "date-after",
        "date-on-or-after",
        "date-before",
        "date-on-or-before",
        "in-date-range",
        "ip-address-in-range",
        "ip-address-not-in-range",
    }
)

Leaf = str | int | float | bool | None
ValueTest = Callable[[Any], bool]


class InvalidPattern(ValueError):
    """An event pattern AWS would reject.

    ``reason`` is AWS's reason text, ``path`` the JSON path of the offending key or value
    (``$`` is the pattern itself), ``aws_message`` the message AWS returns
    ("Event pattern is not valid. Reason: ...").
    """

    def __init__(self, reason: str, path: str = "$") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{AWS_ERROR_PREFIX}{reason} (at {path})")

    @property
    def aws_message(self) -> str:
        return AWS_ERROR_PREFIX + self.reason


# --------------------------------------------------------------------------------------------
# JSON paths for error messages

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _key_path(base: str, key: str) -> str:
    if _IDENT.match(key):
        return f"{base}.{key}"
    return f"{base}[{json.dumps(key, ensure_ascii=False)}]"


def _json_text(value: Any) -> str:
    """How Jackson's getText() shows a token, for messages that quote it."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, dict):
        return "{"
    if isinstance(value, list):
        return "["
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    return str(value)


def _is_number(value: Any) -> bool:
    """A JSON number token (1e400 parses to inf and is still a number to AWS's parser)."""
    t = type(value)
    return t is int or (t is float and not math.isnan(value))


# --------------------------------------------------------------------------------------------
# Numbers: AWS compares numbers as decimals with 6 decimal places in -5e9..5e9. Within that
# domain the nearest doubles keep both order and equality (their spacing near 5e9 is below
# 1e-6), so comparable values are plain floats.


def _decimal_of(value: int | float) -> Decimal:
    return Decimal(value) if type(value) is int else Decimal(repr(value))


def _pattern_number(value: int | float) -> float:
    """A pattern operand as a comparable float, or InvalidPattern's reason (ValueError)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("Value must be between -5.0E9 and 5.0E9, inclusive")
    number = _decimal_of(value).normalize()
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > _MAX_DECIMALS:
        raise ValueError("Only values upto 6 decimals are supported")
    if abs(number) > _FIVE_BILLION:
        raise ValueError("Value must be between -5.0E9 and 5.0E9, inclusive")
    return float(value)


def _comparable(value: Any) -> float | None:
    """An event value as a comparable float, or None if AWS would not compare it."""
    t = type(value)
    if t is int:
        if -_FIVE_BILLION <= value <= _FIVE_BILLION:
            return float(value)
        return None
    if t is float:
        if -_FIVE_BILLION <= value <= _FIVE_BILLION and (
            value.is_integer() or round(value, _MAX_DECIMALS) == value
        ):
            return float(value)
        return None
    return None


# --------------------------------------------------------------------------------------------
# IP addresses, parsed the way AWS recognises them (IPv4 dotted quad, IPv6 hex and colons).

_IPV4 = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+\Z")
_IPV6 = re.compile(r"[0-9a-fA-F:]*:[0-9a-fA-F:]*\Z")


def _looks_like_ip(text: str) -> bool:
    return bool(_IPV4.match(text) or _IPV6.match(text))


def _ip_bytes(text: str) -> bytes | None:
    """The address bytes (4 or 16) of an IP literal, None if TEXT is not one."""
    if _IPV4.match(text):
        parts = [int(p) for p in text.split(".")]
        if all(p <= 255 for p in parts):
            return bytes(parts)
        return None
    if _IPV6.match(text):
        try:
            return ipaddress.IPv6Address(text).packed
        except ValueError:
            return None
    return None


def _parse_cidr(text: str) -> tuple[bytes, bytes]:
    """The inclusive byte range of a CIDR block, as AWS computes it (ValueError: reason)."""
    parts = text.split("/")
    while parts and parts[-1] == "":  # Java's String.split drops trailing empty strings
        parts.pop()
    if len(parts) != 2:
        raise ValueError("Malformed CIDR, one '/' required")
    address, mask_text = parts
    if not re.fullmatch(r"[+-]?[0-9]+", mask_text):
        raise ValueError("Malformed CIDR, mask bits must be an integer")
    mask = int(mask_text)
    if mask < 0:
        raise ValueError("Malformed CIDR, mask bits must not be negative")
    base = None
    if _looks_like_ip(address):
        base = _ip_bytes(address)
        if base is None:
            raise ValueError(f"Invalid IP address: {address}")
    if base is None:
        raise ValueError(f"Nonstandard IP address: {address}")
    if len(base) == 4 and mask > 31:
        raise ValueError("IPv4 mask bits must be < 32")
    if len(base) == 16 and mask > 127:
        raise ValueError("IPv6 mask bits must be < 128")
    host_bits = len(base) * 8 - mask
    top = int.from_bytes(base, "big") | ((1 << host_bits) - 1)
    # AWS keeps the given address as the bottom of the range (host bits are not cleared).
    return base, top.to_bytes(len(base), "big")


# --------------------------------------------------------------------------------------------
# Wildcards


def _parse_wildcard(text: str) -> list[bytes | None]:
    """Tokens of a wildcard pattern: literal bytes, None for '*'. ValueError: AWS's reason."""
    data = text.encode("utf-8")
    tokens: list[bytes | None] = []
    i = 0
    # Positions count the opening quote AWS puts before the value, hence the +1.
    while i < len(data):
        byte = data[i : i + 1]
        if byte == b"*":
            if data[i + 1 : i + 2] == b"*":
                raise ValueError(f"Consecutive wildcard characters at pos {i + 1}")
            tokens.append(None)
        elif byte == b"\\":
            nxt = data[i + 1 : i + 2]
            if nxt not in (b"*", b"\\"):
                raise ValueError(f"Invalid escape character at pos {i + 1}")
            tokens.append(nxt)
            i += 1
        else:
            tokens.append(byte)
        i += 1
    return tokens


def _wildcard_complexity(tokens: list[bytes | None], limit: int) -> int:
    """Most NFA states one input can keep alive at once (capped at LIMIT)."""
    n = len(tokens)

    def closure(states: frozenset[int]) -> frozenset[int]:
        out = set(states)
        for s in sorted(states):
            k = s
            while k < n and tokens[k] is None:
                k += 1
                out.add(k)
        return frozenset(out)

    alphabet = {t for t in tokens if t is not None}
    alphabet.add(b"\x00")  # stands for any byte the pattern does not name
    start = closure(frozenset({0}))
    seen = {start}
    todo = [start]
    worst = len(start)
    while todo:
        current = todo.pop()
        for byte in alphabet:
            nxt: set[int] = set()
            for s in current:
                if s < n:
                    tok = tokens[s]
                    if tok is None:
                        nxt.add(s)
                    elif tok == byte:
                        nxt.add(s + 1)
            if not nxt:
                continue
            state = closure(frozenset(nxt))
            worst = max(worst, len(state))
            if worst >= limit or len(seen) > 20_000:
                return limit
            if state not in seen:
                seen.add(state)
                todo.append(state)
    return worst


def _compile_wildcard(text: str) -> re.Pattern[str]:
    """A compiled wildcard (ValueError: AWS's reason)."""
    tokens = _parse_wildcard(text)
    if _wildcard_complexity(tokens, _MAX_WILDCARD_COMPLEXITY) >= _MAX_WILDCARD_COMPLEXITY:
        raise ValueError(
            "Rule is too complex - try using fewer wildcard characters or fewer repeating "
            "character sequences after a wildcard character"
        )
    raw = b"".join(b"\x00" if t is None else t for t in tokens)
    pieces = raw.decode("utf-8", errors="surrogateescape").split("\x00")
    # NUL never appears in a pattern literal from JSON text in practice; escape the pieces.
    return re.compile(".*".join(re.escape(p) for p in pieces), re.DOTALL)


# --------------------------------------------------------------------------------------------
# Per-field value tests. Each pattern element contributes to one of four typed lists; the
# field's test dispatches on the JSON type of the event value.


class _FieldSpec:
    """What one field (a dotted name) of one branch accepts: built while compiling."""

    __slots__ = (
        "absent_ok",
        "bool_values",
        "elements",
        "inline",
        "ip_values",
        "null_ok",
        "num_preds",
        "num_raw",
        "num_values",
        "str_preds",
        "str_values",
        "universal",
    )

    def __init__(self) -> None:
        self.str_values: set[str] = set()
        self.ip_values: set[bytes] = set()
        self.num_values: set[float] = set()
        self.num_raw: list[int | float] = []
        self.bool_values: set[bool] = set()
        self.null_ok = False
        self.absent_ok = False
        self.str_preds: list[ValueTest] = []
        self.num_preds: list[ValueTest] = []
        # Predicates that apply to every JSON type (anything-but, exists: true).
        self.universal: list[ValueTest] = []
        # The last operator element's inlinable form, used when it is the only element.
        self.inline: tuple[str, Any] | None = None
        self.elements = 0

    def only_strings(self) -> frozenset[str] | None:
        """The accepted strings, when the field accepts exactly a set of strings."""
        if self.str_values and not (
            self.ip_values
            or self.num_values
            or self.num_raw
            or self.bool_values
            or self.null_ok
            or self.str_preds
            or self.num_preds
            or self.universal
        ):
            return frozenset(self.str_values)
        return None

    def build_test(self) -> ValueTest:
        str_values = frozenset(self.str_values)
        ip_values = frozenset(self.ip_values)
        num_values = frozenset(self.num_values)
        num_raw = tuple(self.num_raw)
        bool_values = frozenset(self.bool_values)
        null_ok = self.null_ok
        universal = tuple(self.universal)
        str_preds = tuple(self.str_preds) + universal
        num_preds = tuple(self.num_preds) + universal

        # Common shapes first: a plain list of strings, one operator.
        if not (
            ip_values or num_values or num_raw or bool_values or null_ok or str_preds or num_preds
        ):

            def only_strings(v: Any) -> bool:
                return type(v) is str and v in str_values

            return only_strings
        if not (ip_values or num_values or num_raw or bool_values or null_ok or str_values):
            if len(universal) == 1 and len(str_preds) == 1 and len(num_preds) == 1:
                return universal[0]  # one anything-but or exists: true
            if not universal and len(str_preds) == 1 and not num_preds:
                one_str = str_preds[0]

                def one_string_operator(v: Any) -> bool:
                    return type(v) is str and one_str(v)

                return one_string_operator
            if not universal and len(num_preds) == 1 and not str_preds:
                one_num = num_preds[0]

                def one_numeric(v: Any) -> bool:
                    t = type(v)
                    return (t is int or t is float) and one_num(v)

                return one_numeric

        def test(v: Any) -> bool:
            t = type(v)
            if t is str:
                if v in str_values:
                    return True
                if ip_values and _looks_like_ip(v) and _ip_bytes(v) in ip_values:
                    return True
                for pred in str_preds:  # noqa: SIM110 - a loop beats any() here
                    if pred(v):
                        return True
                return False
            if t is int or t is float:
                if num_values and _comparable(v) in num_values:
                    return True
                for raw in num_raw:
                    if type(raw) is t and raw == v:
                        return True
                for pred in num_preds:  # noqa: SIM110
                    if pred(v):
                        return True
                return False
            if t is bool:
                if v in bool_values:
                    return True
            elif v is None and null_ok:
                return True
            for pred in universal:  # noqa: SIM110
                if pred(v):
                    return True
            return False

        return test


# String predicates (called only with str values).


def _starts_with(prefix: str) -> ValueTest:
    def test(v: str) -> bool:
        return v.startswith(prefix)

    return test


def _ends_with(suffix: str) -> ValueTest:
    def test(v: str) -> bool:
        return v.endswith(suffix)

    return test


def _equals_folded(folded: str) -> ValueTest:
    def test(v: str) -> bool:
        return v.lower() == folded

    return test


def _starts_with_folded(folded: str) -> ValueTest:
    def test(v: str) -> bool:
        return v.lower().startswith(folded)

    return test


def _ends_with_folded(folded: str) -> ValueTest:
    def test(v: str) -> bool:
        return v.lower().endswith(folded)

    return test


def _full_match(regex: re.Pattern[str]) -> ValueTest:
    def test(v: str) -> bool:
        return regex.fullmatch(v) is not None

    return test


def _always(_: Any) -> bool:
    return True


def _never(_: Any) -> bool:
    return False


# --------------------------------------------------------------------------------------------
# The compiler: mirrors AWS's streaming compiler, so errors come in document order and $or
# forks branches exactly as AWS does (fields after a $or go to every branch; a repeated name in
# one branch overrides the earlier one).

Branch = dict[str, tuple[_FieldSpec, str]]  # dotted name -> (spec, JSON path)


def _loads(text: str) -> Any:
    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    def merge_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Duplicate keys: AWS's streaming parser applies both; nested objects merge and a
        # repeated leaf overrides.
        out: dict[str, Any] = {}
        for key, value in pairs:
            old = out.get(key)
            if isinstance(old, dict) and isinstance(value, dict):
                merged = dict(old)
                merged.update(value)
                out[key] = merged
            else:
                out.pop(key, None)
                out[key] = value
        return out

    return json.loads(text, object_pairs_hook=merge_pairs, parse_constant=reject_constant)


class _Compiler:
    def __init__(self) -> None:
        self.rules: list[Branch] = []

    def compile_top(self, pattern: Any) -> list[Branch]:
        if not isinstance(pattern, dict):
            raise InvalidPattern("Filter is not an object", "$")
        self.parse_object(pattern, [], "$", inside_or=False)
        return self.rules

    def parse_object(
        self, obj: dict[str, Any], prefix: list[str], jpath: str, inside_or: bool
    ) -> None:
        if not obj:
            raise InvalidPattern("Empty objects are not allowed", jpath)
        for key, value in obj.items():
            if not isinstance(key, str):
                raise InvalidPattern(f"Field name {key!r} must be a string", jpath)
            kpath = _key_path(jpath, key)
            if key == "$or":
                self.parse_or(value, prefix, kpath)
                continue
            if inside_or and key in _RESERVED_IN_OR:
                raise InvalidPattern(
                    f"{key} is Ruler reserved fieldName which cannot be used inside $or.", kpath
                )
            if isinstance(value, dict):
                self.parse_object(value, [*prefix, key], kpath, inside_or)
            elif isinstance(value, list):
                self.write_rules(".".join([*prefix, key]), value, kpath)
            else:
                raise InvalidPattern(f'"{key}" must be an object or an array', kpath)

    def parse_or(self, value: Any, prefix: list[str], jpath: str) -> None:
        current = [dict(rule) for rule in self.rules]
        self.rules = []
        if not isinstance(value, list):
            raise InvalidPattern("It must be an Array followed with $or.", jpath)
        for index, element in enumerate(value):
            epath = f"{jpath}[{index}]"
            if not isinstance(element, dict):
                raise InvalidPattern(
                    "Only JSON object is allowed in array of $or relationship.", epath
                )
            outer = self.rules
            self.rules = [dict(rule) for rule in current] or [{}]
            self.parse_object(element, prefix, epath, inside_or=True)
            outer.extend(self.rules)
            self.rules = outer
        if len(value) < 2:
            raise InvalidPattern("There must have at least 2 Objects in $or relationship.", jpath)

    def write_rules(self, name: str, values: list[Any], jpath: str) -> None:
        spec = _FieldSpec()
        spec.elements = len(values)
        for index, value in enumerate(values):
            vpath = f"{jpath}[{index}]"
            if isinstance(value, dict):
                _match_expression(spec, value, vpath)
            elif isinstance(value, str):
                ip = _ip_bytes(value) if _looks_like_ip(value) else None
                if ip is not None:
                    spec.ip_values.add(ip)
                else:
                    spec.str_values.add(value)
            elif value is True or value is False:
                spec.bool_values.add(value)
            elif value is None:
                spec.null_ok = True
            elif _is_number(value):
                try:
                    spec.num_values.add(_pattern_number(value))
                except ValueError:
                    spec.num_raw.append(value)  # matched as literal text only, as AWS does
            else:
                raise InvalidPattern(
                    "Match value must be String, number, true, false, or null", vpath
                )
        if not values:
            raise InvalidPattern("Empty arrays are not allowed", jpath)
        if not self.rules:
            self.rules.append({})
        for rule in self.rules:
            rule.pop(name, None)
            rule[name] = (spec, jpath)


def _only_key(expr: dict[str, Any], jpath: str, message: str) -> None:
    if len(expr) > 1:
        extra = list(expr)[1]
        raise InvalidPattern(message, _key_path(jpath, extra))


def _match_expression(spec: _FieldSpec, expr: dict[str, Any], jpath: str) -> None:
    """Add one `{operator: operand}` element to SPEC, validating it as AWS does."""
    if not expr:
        raise InvalidPattern("Match expression name not found", jpath)
    op, operand = next(iter(expr.items()))
    opath = _key_path(jpath, op)
    one_key = "Only one key allowed in match expression"

    if op == "prefix" or op == "suffix":
        if isinstance(operand, dict):
            _prefix_suffix_ignore_case(spec, op, operand, opath)
            _only_key(expr, jpath, one_key)
            return
        if not isinstance(operand, str):
            raise InvalidPattern(f"{op} match pattern must be a string", opath)
        _only_key(expr, jpath, one_key)
        if op == "prefix":
            spec.str_preds.append(_starts_with(operand))
            spec.inline = ("prefix", operand)
        else:
            spec.str_preds.append(_ends_with(operand))
        return

    if op == "numeric":
        if not isinstance(operand, list):
            raise InvalidPattern("Value of numeric must be an array.", opath)
        rng = _numeric(operand, opath)
        spec.num_preds.append(_numeric_test(rng))
        spec.inline = ("numeric", rng)
        _only_key(expr, jpath, "Too many elements in numeric expression")
        return

    if op == "anything-but":
        test, excluded = _anything_but(operand, opath)
        spec.universal.append(test)
        if excluded is not None:
            spec.inline = ("anything-but-strings", excluded)
        _only_key(expr, jpath, "Too many elements in numeric expression")
        return

    if op == "exists":
        if operand is True:
            spec.universal.append(_always)
            spec.inline = ("exists", None)
        elif operand is False:
            spec.absent_ok = True
        else:
            raise InvalidPattern("exists match pattern must be either true or false.", opath)
        _only_key(expr, jpath, one_key)
        return

    if op == "cidr":
        if not isinstance(operand, str):
            raise InvalidPattern("prefix match pattern must be a string", opath)
        try:
            low, high = _parse_cidr(operand)
        except ValueError as exc:
            raise InvalidPattern(str(exc), opath) from None
        _only_key(expr, jpath, one_key)

        def in_block(v: str, low: bytes = low, high: bytes = high) -> bool:
            if not _looks_like_ip(v):
                return False
            ip = _ip_bytes(v)
            return ip is not None and len(ip) == len(low) and low <= ip <= high

        spec.str_preds.append(in_block)
        return

    if op == "equals-ignore-case":
        if not isinstance(operand, str):
            raise InvalidPattern("equals-ignore-case match pattern must be a string", opath)
        _only_key(expr, jpath, one_key)
        folded = operand.lower()
        spec.str_preds.append(_equals_folded(folded))
        return

    if op == "wildcard":
        if not isinstance(operand, str):
            raise InvalidPattern("wildcard match pattern must be a string", opath)
        try:
            regex = _compile_wildcard(operand)
        except ValueError as exc:
            raise InvalidPattern(str(exc), opath) from None
        _only_key(expr, jpath, one_key)
        spec.str_preds.append(_full_match(regex))
        return

    raise InvalidPattern(f"Unrecognized match type {op}", opath)


def _prefix_suffix_ignore_case(
    spec: _FieldSpec, op: str, operand: dict[str, Any], jpath: str
) -> None:
    label = op.capitalize()
    if not operand:
        raise InvalidPattern(f"{label} expression name not found", jpath)
    inner, value = next(iter(operand.items()))
    ipath = _key_path(jpath, inner)
    if inner != "equals-ignore-case":
        raise InvalidPattern(f"Unsupported {op} pattern: {inner}", ipath)
    if not isinstance(value, str):
        raise InvalidPattern("equals-ignore-case match pattern must be a string", ipath)
    _only_key(operand, jpath, "Only one key allowed in match expression")
    folded = value.lower()
    if op == "prefix":
        spec.str_preds.append(_starts_with_folded(folded))
    else:
        spec.str_preds.append(_ends_with_folded(folded))


NumericRange = tuple[float, bool, float, bool]  # low, low is open, high, high is open

_DOMAIN_LOW: Final = float(-_FIVE_BILLION)
_DOMAIN_HIGH: Final = float(_FIVE_BILLION)


def _numeric_test(rng: NumericRange) -> ValueTest:
    low, open_low, high, open_high = rng

    def in_range(v: Any) -> bool:
        c = _comparable(v)
        if c is None:
            return False
        if (c <= low) if open_low else (c < low):
            return False
        return (c < high) if open_high else (c <= high)

    return in_range


def _numeric(operand: list[Any], jpath: str) -> NumericRange:
    """A numeric comparison or range as an interval, validated with AWS's messages."""

    def item(i: int) -> Any:
        return operand[i] if i < len(operand) else _END

    def numeric_value(i: int, op: str) -> float:
        value = item(i)
        if value is _END or not _is_number(value):
            label = "equals" if op == "=" else op
            raise InvalidPattern(f"Value of {label} must be numeric", f"{jpath}[{i}]")
        try:
            return _pattern_number(value)
        except ValueError as exc:
            raise InvalidPattern(str(exc), f"{jpath}[{i}]") from None

    first = item(0)
    if not isinstance(first, str):
        text = "]" if first is _END else _json_text(first)
        raise InvalidPattern(f"Invalid member in numeric match: {text}", f"{jpath}[0]")
    if first not in ("=", "<", "<=", ">", ">="):
        raise InvalidPattern(f"Unrecognized numeric range operator: {first}", f"{jpath}[0]")
    if first in ("=", "<", "<="):
        if not _is_number(item(1)):
            numeric_value(1, first)  # raises with AWS's message
        if len(operand) > 2:
            raise InvalidPattern("Too many elements in numeric expression", f"{jpath}[2]")
        bound = numeric_value(1, first)
        if first == "=":
            return bound, False, bound, False
        return _DOMAIN_LOW, False, bound, first == "<"

    if not _is_number(item(1)):
        numeric_value(1, first)
    low_raw = item(1)
    if len(operand) == 2:
        low = numeric_value(1, first)
        return low, first == ">", _DOMAIN_HIGH, False
    second = item(2)
    if not isinstance(second, str):
        raise InvalidPattern(f"Bad value in numeric range: {_json_text(second)}", f"{jpath}[2]")
    if second not in ("<", "<="):
        raise InvalidPattern(f"Bad numeric range operator: {second}", f"{jpath}[2]")
    if not _is_number(item(3)):
        raise InvalidPattern(f"Value of {second} must be numeric", f"{jpath}[3]")
    if len(operand) > 4:
        raise InvalidPattern("Too many terms in numeric range expression", f"{jpath}[4]")
    low = numeric_value(1, first)
    high = numeric_value(3, second)
    if _decimal_of(low_raw) >= _decimal_of(item(3)):
        raise InvalidPattern("Bottom must be less than top", jpath)
    return low, first == ">", high, second == "<"


_END: Final = object()


def _anything_but(operand: Any, jpath: str) -> tuple[ValueTest, frozenset[str] | None]:
    """anything-but: true for any value (of any JSON type) that the operand does not name."""
    kind = "values"
    vpath = jpath
    if isinstance(operand, dict):
        if not operand:
            raise InvalidPattern("Anything-But expression name not found", jpath)
        extra = list(operand)[1:]
        kind, operand = next(iter(operand.items()))
        vpath = _key_path(jpath, kind)
        if kind not in ("equals-ignore-case", "prefix", "suffix", "wildcard"):
            raise InvalidPattern(f"Unsupported anything-but pattern: {kind}", vpath)
        test = _anything_but_set(kind, operand, vpath)
        if extra:
            raise InvalidPattern(
                "Too many elements in numeric expression", _key_path(jpath, extra[0])
            )
        return test, None
    test = _anything_but_set(kind, operand, vpath)
    if isinstance(operand, str) or (
        isinstance(operand, list) and all(isinstance(v, str) for v in operand)
    ):
        return test, frozenset(operand if isinstance(operand, list) else [operand])
    return test, None


def _anything_but_set(kind: str, operand: Any, vpath: str) -> ValueTest:
    if not (isinstance(operand, (str, list)) or _is_number(operand)):
        raise InvalidPattern(
            "Value of anything-but must be an array or single string/number value.", vpath
        )
    values = operand if isinstance(operand, list) else [operand]
    single = not isinstance(operand, list)

    if kind == "values":
        strings: set[str] = set()
        numbers: set[float] = set()
        for i, value in enumerate(values):
            ipath = vpath if single else f"{vpath}[{i}]"
            if isinstance(value, str):
                strings.add(value)
            elif _is_number(value):
                try:
                    numbers.add(_pattern_number(value))
                except ValueError as exc:
                    raise InvalidPattern(str(exc), ipath) from None
            elif single:
                raise InvalidPattern(
                    "Inside anything-but list, start|null|boolean is not supported.", ipath
                )
            else:
                raise InvalidPattern(
                    "Inside anything but list, start|null|boolean is not supported.", ipath
                )
        if bool(strings) == bool(numbers):
            raise InvalidPattern(
                "Inside anything but list, either all values are number or string, "
                "mixed type is not supported",
                vpath,
            )
        if numbers:
            frozen_numbers = frozenset(numbers)

            def not_number(v: Any) -> bool:
                t = type(v)
                if t is int or t is float:
                    return _comparable(v) not in frozen_numbers
                return True

            return not_number
        frozen_strings = frozenset(strings)
        return lambda v: type(v) is not str or v not in frozen_strings

    texts: list[str] = []
    for i, value in enumerate(values):
        ipath = vpath if single else f"{vpath}[{i}]"
        if not isinstance(value, str):
            if kind == "equals-ignore-case":
                reason = (
                    "Inside anything-but/equals-ignore-case list, "
                    "number|start|null|boolean is not supported."
                )
            elif kind == "wildcard":
                reason = "wildcard match pattern must be a string"
            else:
                reason = "prefix/suffix match pattern must be a string"
            raise InvalidPattern(reason, ipath)
        if kind in ("prefix", "suffix") and value == "":
            raise InvalidPattern("Null prefix/suffix not allowed", ipath)
        texts.append(value)

    if kind == "equals-ignore-case":
        folded = frozenset(t.lower() for t in texts)
        return lambda v: type(v) is not str or v.lower() not in folded
    if kind == "prefix":
        prefixes = tuple(texts)
        return lambda v: type(v) is not str or not v.startswith(prefixes)
    if kind == "suffix":
        suffixes = tuple(texts)
        return lambda v: type(v) is not str or not v.endswith(suffixes)
    regexes: list[re.Pattern[str]] = []
    for i, text in enumerate(texts):
        try:
            regexes.append(_compile_wildcard(text))
        except ValueError as exc:
            raise InvalidPattern(str(exc), vpath if single else f"{vpath}[{i}]") from None
    frozen_regexes = tuple(regexes)
    return lambda v: type(v) is not str or not any(r.fullmatch(v) for r in frozen_regexes)


# --------------------------------------------------------------------------------------------
# Matching


class _MissingType:
    __slots__ = ()


_MISSING: Final = _MissingType()

# One compiled field: (path segments, dotted alternatives per level, value test, absent_ok,
# the set of accepted strings when that is all the field accepts (else None), and the
# inlinable form of its one operator (else None)).
_Field = tuple[
    tuple[str, ...],
    tuple[tuple[str, ...], ...],
    ValueTest,
    bool,
    frozenset[str] | None,
    tuple[str, Any] | None,
]


def _make_field(name: str, spec: _FieldSpec) -> _Field:
    segs = tuple(name.split("."))
    alternatives = tuple(
        tuple(".".join(segs[i:j]) for j in range(i + 2, len(segs) + 1)) for i in range(len(segs))
    )
    test = spec.build_test()
    if not (
        spec.str_values
        or spec.ip_values
        or spec.num_values
        or spec.num_raw
        or spec.bool_values
        or spec.null_ok
        or spec.str_preds
        or spec.num_preds
        or spec.universal
    ):
        test = _never  # only {"exists": false}: no value can satisfy it
    inline = spec.inline if spec.elements == 1 and not spec.absent_ok else None
    return segs, alternatives, test, spec.absent_ok, spec.only_strings(), inline


def _has_dotted_alternative(event: Any, field: _Field) -> bool:
    """Does the event hold a key with a dot that spells part of FIELD's path?"""
    segs, alternatives = field[0], field[1]
    node = event
    for level, seg in enumerate(segs):
        if type(node) is not dict:
            return False
        for key in alternatives[level]:
            if key in node:
                return True
        node = node.get(seg)
    return False


def _collect(
    node: Any,
    field: _Field,
    level: int,
    membership: tuple[tuple[int, int], ...],
    out: list[tuple[Any, tuple[tuple[int, int], ...]]],
) -> None:
    """Every leaf of NODE named by FIELD's path from LEVEL on, with its array positions."""
    segs = field[0]
    if type(node) is list:
        array_id = id(node)
        for index, element in enumerate(node):
            _collect(element, field, level, (*membership, (array_id, index)), out)
        return
    if level == len(segs):
        if type(node) is not dict:
            out.append((node, membership))
        return
    if type(node) is not dict:
        return
    seg = segs[level]
    if seg in node:
        _collect(node[seg], field, level + 1, membership, out)
    for offset, key in enumerate(field[1][level]):
        if key in node:
            _collect(node[key], field, level + 2 + offset, membership, out)


def _consistent(membership: tuple[tuple[int, int], ...], binding: dict[int, int]) -> bool:
    for array_id, index in membership:  # noqa: SIM110
        if binding.get(array_id, index) != index:
            return False
    return True


def _match_exact(fields: tuple[_Field, ...], event: Any) -> bool:
    """The exact (array-consistent) match: a backtracking search over candidate leaves."""
    plans: list[tuple[list[tuple[tuple[int, int], ...]], list[tuple[tuple[int, int], ...]], bool]]
    plans = []
    for field in fields:
        leaves: list[tuple[Any, tuple[tuple[int, int], ...]]] = []
        _collect(event, field, 0, (), leaves)
        test, absent_ok = field[2], field[3]
        passing = [m for v, m in leaves if test(v)]
        if not passing and not absent_ok:
            return False
        plans.append((passing, [m for _, m in leaves], absent_ok))
    plans.sort(key=lambda p: (p[2], len(p[0])))

    def search(k: int, binding: dict[int, int], deferred: list[int]) -> bool:
        if k == len(plans):
            return all(not any(_consistent(m, binding) for m in plans[d][1]) for d in deferred)
        passing, _, absent_ok = plans[k]
        for membership in passing:
            if _consistent(membership, binding):
                merged = dict(binding)
                merged.update(membership)
                if search(k + 1, merged, deferred):
                    return True
        return absent_ok and search(k + 1, binding, [*deferred, k])

    return search(0, {}, [])


def _branch_matcher(fields: tuple[_Field, ...]) -> Callable[[Any], bool]:
    """Generate the branch's matcher: straight-line lookups and tests, one block per field.

    Generated code (not a loop over the pattern) because this is the hot path of routing:
    each field costs a few dict lookups and, for the common operators (exact strings, one
    numeric range, one anything-but list, one prefix, exists), an inlined test. Any array on
    the path, or a key spelling part of the path with a dot, hands the event to the exact
    search. Pattern text never enters the code: values are bound as namespace names.
    """
    namespace: dict[str, Any] = {
        "_M": _MISSING,
        "_exact": lambda event: _match_exact(fields, event),
        "dict": dict,
        "list": list,
        "str": str,
        "int": int,
        "float": float,
        "type": type,
        "round": round,
    }
    lines = ["def match(event):", "    if type(event) is not dict:", "        return False"]
    for i, field in enumerate(fields):
        segs, alternatives, test, absent_ok, strings, inline = field
        namespace[f"T{i}"] = test
        for j, seg in enumerate(segs):
            namespace[f"K{i}_{j}"] = seg
        lines.append(f"    n = event.get(K{i}_0, _M)")
        for j in range(1, len(segs)):
            lines += [
                f"    p{j} = n",
                "    t = type(n)",
                "    if t is dict:",
                f"        n = n.get(K{i}_{j}, _M)",
                "    elif t is list:",
                "        return _exact(event)",
                "    else:",
                "        n = _M",
            ]
        # Dotted alternatives, checked only when the plain path fails.
        parts = []
        for level in range(len(segs) - 1):
            node = "event" if level == 0 else f"p{level}"
            names = []
            for k, key in enumerate(alternatives[level]):
                namespace[f"A{i}_{level}_{k}"] = key
                names.append(f"A{i}_{level}_{k} in {node}")
            check = " or ".join(names)
            parts.append(f"({check})" if level == 0 else f"(type({node}) is dict and ({check}))")
        alt_lines = []
        if parts:
            alt_lines = [f"        if {' or '.join(parts)}:", "            return _exact(event)"]
        lines += ["    t = type(n)", "    if t is list:", "        return _exact(event)"]
        lines.append("    if n is _M or t is dict:")
        lines += alt_lines
        lines.append("        pass" if absent_ok else "        return False")
        kind = inline[0] if inline is not None else None
        if strings is not None:
            namespace[f"S{i}"] = strings
            lines.append(f"    elif not (t is str and n in S{i}):")
        elif kind == "numeric":
            assert inline is not None
            low, open_low, high, open_high = inline[1]
            namespace[f"L{i}"], namespace[f"H{i}"] = low, high
            lo_op = "<" if open_low else "<="
            hi_op = "<" if open_high else "<="
            lines.append(
                "    elif not ((t is int or (t is float and (n.is_integer() or "
                f"round(n, {_MAX_DECIMALS}) == n))) and L{i} {lo_op} n {hi_op} H{i}):"
            )
        elif kind == "anything-but-strings":
            assert inline is not None
            namespace[f"X{i}"] = inline[1]
            lines.append(f"    elif t is str and n in X{i}:")
        elif kind == "prefix":
            assert inline is not None
            namespace[f"P{i}"] = inline[1]
            lines.append(f"    elif not (t is str and n.startswith(P{i})):")
        elif kind == "exists":
            continue  # any leaf will do
        else:
            lines.append(f"    elif not T{i}(n):")
        lines += alt_lines
        lines.append("        return False")
    lines.append("    return True")
    exec("\n".join(lines), namespace)  # code built above from fixed templates
    match: Callable[[Any], bool] = namespace["match"]
    return match


class Pattern:
    """A compiled event pattern. ``matches(event)`` is the hot path; ``source`` the input."""

    __slots__ = ("_branches", "matches", "source")

    def __init__(self, source: dict[str, Any], branches: list[tuple[_Field, ...]]) -> None:
        self.source = source
        self._branches = branches
        matchers = tuple(_branch_matcher(fields) for fields in branches)
        if len(matchers) == 1:
            only = matchers[0]

            self.matches: Callable[[dict[str, Any]], bool] = only
        else:

            def match_any(event: dict[str, Any]) -> bool:
                for matcher in matchers:  # noqa: SIM110
                    if matcher(event):
                        return True
                return False

            self.matches = match_any

    @property
    def field_names(self) -> list[str]:
        """Every dotted field name the pattern tests (for docs and diagnostics)."""
        names: dict[str, None] = {}
        for fields in self._branches:
            for field in fields:
                names[".".join(field[0])] = None
        return list(names)

    def __repr__(self) -> str:
        return f"Pattern({json.dumps(self.source, sort_keys=True)})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Generated matchers do not pickle; a pattern travels as its source and recompiles.
        return compile, (self.source,)

    def __iter__(self) -> Iterator[tuple[_Field, ...]]:  # pragma: no cover - debugging aid
        return iter(self._branches)


def compile(pattern: dict[str, Any] | str) -> Pattern:
    """Validate and compile PATTERN (a dict, or its JSON text). Raises InvalidPattern."""
    if isinstance(pattern, str):
        try:
            source = _loads(pattern)
        except ValueError as exc:
            where = ""
            if isinstance(exc, json.JSONDecodeError):
                where = f" ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            raise InvalidPattern(f"Filter is not valid JSON{where}", "$") from None
    else:
        source = pattern
    rules = _Compiler().compile_top(source)
    branches: list[tuple[_Field, ...]] = []
    for rule in rules:
        fields = [_make_field(name, spec) for name, (spec, _) in rule.items()]
        # Cheap, selective fields first: short paths (source, detail-type) before deep ones.
        fields.sort(key=lambda f: len(f[0]))
        branches.append(tuple(fields))
    return Pattern(source, branches)


def matches(pattern: dict[str, Any] | str | Pattern, event: dict[str, Any]) -> bool:
    """Does EVENT match PATTERN? Compiles PATTERN if needed (compile once for hot loops)."""
    compiled = pattern if isinstance(pattern, Pattern) else compile(pattern)
    return compiled.matches(event)


# --------------------------------------------------------------------------------------------
# A set of rules, indexed for routing.

K = TypeVar("K")

# The top-level field a rule is indexed by: most rules name it with exact strings, and every
# event carries it as a plain string.
_INDEX_FIELD: Final = "detail-type"

_Candidates = tuple[tuple[Any, Callable[[Any], bool]], ...]


class PatternIndex(Generic[K]):
    """Many patterns, each under a key (a rule name, a target): which keys match an event?

    Same answers as testing every pattern, faster: a pattern whose every branch requires
    `detail-type` to be one of a few exact strings is filed under those strings, so an event
    is tested only against the patterns filed under its own detail-type plus the patterns that
    could not be filed (one dict lookup, then a precomputed list in insertion order). Keys come
    back in insertion order.
    """

    def __init__(self) -> None:
        self._entries: dict[K, tuple[Pattern, frozenset[str] | None]] = {}
        self._by_value: dict[str, _Candidates] = {}
        self._unfiled: _Candidates = ()
        self._everything: _Candidates = ()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def add(self, key: K, pattern: Pattern | dict[str, Any] | str) -> Pattern:
        """File PATTERN under KEY (replacing KEY's previous pattern). Raises InvalidPattern."""
        compiled = pattern if isinstance(pattern, Pattern) else compile(pattern)
        self._entries.pop(key, None)
        self._entries[key] = (compiled, _required_strings(compiled, _INDEX_FIELD))
        self._rebuild()
        return compiled

    def remove(self, key: K) -> None:
        del self._entries[key]
        self._rebuild()

    def _rebuild(self) -> None:
        values: set[str] = set()
        for _, filed in self._entries.values():
            values |= filed or set()
        self._by_value = {
            value: tuple(
                (key, compiled.matches)
                for key, (compiled, filed) in self._entries.items()
                if filed is None or value in filed
            )
            for value in values
        }
        self._unfiled = tuple(
            (key, compiled.matches)
            for key, (compiled, filed) in self._entries.items()
            if filed is None
        )
        self._everything = tuple(
            (key, compiled.matches) for key, (compiled, _) in self._entries.items()
        )

    def matching(self, event: dict[str, Any]) -> list[K]:
        """The keys whose pattern matches EVENT, in insertion order."""
        if type(event) is not dict:
            return []
        value = event.get(_INDEX_FIELD)
        if type(value) is str:
            candidates = self._by_value.get(value, self._unfiled)
        elif value is None:
            candidates = self._unfiled
        else:  # an array (or another type): leave it to the patterns themselves
            candidates = self._everything
        return [key for key, match in candidates if match(event)]


def _required_strings(pattern: Pattern, name: str) -> frozenset[str] | None:
    """The strings top-level field NAME must equal in every branch of PATTERN, if so."""
    found: set[str] = set()
    for fields in pattern._branches:
        for field in fields:
            if field[0] == (name,) and field[4] is not None and not field[3]:
                found |= field[4]
                break
        else:
            return None
    return frozenset(found)
