"""A table's schema: field names, dtypes and shapes, and the explicit byte encoding of a record.

A record is the concatenation of its fields' raw little-endian bytes, in schema order, with no padding
(a packed numpy structured dtype). Nothing is pickled: reading a record is `np.frombuffer` on bytes
whose layout the schema alone defines, so whoever can write to Redis can corrupt numbers but cannot
make a learner run code.

The schema travels as JSON (stored in Redis next to the table and compared on open)::

    {"fields": [{"name": "obs", "dtype": "<f4", "shape": [17], "finite": false}, ...]}

Validation (`Schema.encode`) rejects, naming the field: a missing or extra field, a batch whose
leading dimension differs between fields, a wrong per-record shape, a dtype that cannot be cast
safely, and NaN/inf in a field declared `finite=True`. What "safely" means:

- numpy's "safe" casts (no information lost: int32 -> int64, uint8 -> float32, bool -> anything);
- integer -> narrower/other-signed integer when every value fits the target's range;
- float -> narrower float when no finite value overflows to inf (float64 observations into a
  float32 field are the common case);
- integer -> float (exact for the small integers RL produces);
- everything else is refused: float -> int (truncation), int/float -> bool, complex, strings, objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.replay.errors import SchemaError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ALLOWED_KINDS = "biuf"  # bool, signed int, unsigned int, float


def _canonical_dtype(dtype: Any) -> np.dtype:
    """The little-endian numpy dtype for `dtype`; only bool/int/uint/float scalars are storable."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise SchemaError(f"unknown dtype {dtype!r}: use e.g. float32, int64, bool, uint8") from exc
    if dt.kind not in _ALLOWED_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise SchemaError(f"dtype {dt} cannot be stored: use a bool, int, uint or float dtype")
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


@dataclass(frozen=True)
class Field:
    """One named array per record: `shape` is the per-record shape (() for a scalar)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...] = ()
    finite: bool = False  # True: NaN and +-inf are rejected (float fields only)

    def __init__(self, name: str, dtype: Any, shape: Sequence[int] | int = (), finite: bool = False) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise SchemaError(f"field name {name!r} is not valid: use letters, digits and _ (not first a digit)")
        shape_t = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        if any(s < 0 for s in shape_t):
            raise SchemaError(f"field {name!r}: shape {shape_t} has a negative dimension")
        dt = _canonical_dtype(dtype)
        if finite and dt.kind != "f":
            raise SchemaError(f"field {name!r}: finite=True only applies to float dtypes, not {dt}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dt)
        object.__setattr__(self, "shape", shape_t)
        object.__setattr__(self, "finite", bool(finite))

    @property
    def nbytes(self) -> int:
        """Bytes of one record's value of this field."""
        return int(self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype.str, "shape": list(self.shape), "finite": self.finite}

    def describe(self) -> str:
        return f"{self.name}: {self.dtype.name}{list(self.shape)}" + (" finite" if self.finite else "")


@dataclass(frozen=True)
class Schema:
    """An ordered tuple of fields; `record_size` bytes per record."""

    fields: tuple[Field, ...]
    _struct: np.dtype = field(init=False, repr=False, compare=False)

    def __init__(self, fields: Sequence[Field]) -> None:
        fields_t = tuple(fields)
        if not fields_t:
            raise SchemaError("a schema needs at least one field")
        names = [f.name for f in fields_t]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"duplicate field names in schema: {dupes}")
        object.__setattr__(self, "fields", fields_t)
        # A list of (name, dtype, shape) gives a packed (unaligned) structured dtype: no padding bytes.
        object.__setattr__(self, "_struct", np.dtype([(f.name, f.dtype, f.shape) for f in fields_t]))
        if self._struct.itemsize == 0:
            raise SchemaError("a schema's records must not be empty (all fields have zero size)")

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Schema:
        """`{"obs": ("float32", (17,)), "done": "bool", "img": ("uint8", (84, 84), {"finite": False})}`."""
        fields = []
        for name, value in spec.items():
            if isinstance(value, Field):
                fields.append(value)
            elif isinstance(value, tuple):
                fields.append(Field(name, *value[:2], **(value[2] if len(value) > 2 else {})))
            else:
                fields.append(Field(name, value))
        return cls(fields)

    @property
    def record_size(self) -> int:
        return int(self._struct.itemsize)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def to_json(self) -> str:
        return json.dumps({"fields": [f.to_json() for f in self.fields]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Schema:
        try:
            spec = json.loads(text)
            return cls([Field(f["name"], f["dtype"], f["shape"], f.get("finite", False)) for f in spec["fields"]])
        except (ValueError, KeyError, TypeError) as exc:
            raise SchemaError(f"stored schema is not valid schema JSON: {exc}") from exc

    def describe(self) -> str:
        return "{" + ", ".join(f.describe() for f in self.fields) + "}"

    def diff(self, other: Schema) -> str:
        """Human-readable differences between two schemas (empty when equal)."""
        mine, theirs = {f.name: f for f in self.fields}, {f.name: f for f in other.fields}
        parts = []
        for name in mine.keys() - theirs.keys():
            parts.append(f"field {name!r} only in the first")
        for name in theirs.keys() - mine.keys():
            parts.append(f"field {name!r} only in the second")
        for name in mine.keys() & theirs.keys():
            if mine[name] != theirs[name]:
                parts.append(f"field {name!r}: {mine[name].describe()} vs {theirs[name].describe()}")
        if not parts and self.names != other.names:
            parts.append(f"field order {list(self.names)} vs {list(other.names)}")
        return "; ".join(sorted(parts))

    # -- encoding ----------------------------------------------------------------------------------------------

    def encode(self, batch: Mapping[str, Any]) -> tuple[int, bytes]:
        """Validate a batch (each field an array of shape (n, *field.shape)); return (n, packed records)."""
        if not isinstance(batch, Mapping):
            raise SchemaError(f"a batch must be a dict of field name -> array, not {type(batch).__name__}")
        missing = [n for n in self.names if n not in batch]
        extra = sorted(str(k) for k in batch.keys() if k not in self.names)
        if missing or extra:
            raise SchemaError(
                "batch does not match the schema: "
                + "; ".join(
                    ([f"missing field(s) {missing}"] if missing else [])
                    + ([f"extra field(s) {extra}"] if extra else [])
                )
                + f" (schema {self.describe()})"
            )
        arrays = {f.name: _cast_field(f, batch[f.name]) for f in self.fields}
        sizes = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise SchemaError(f"fields have different batch sizes (leading dimension): {sizes}")
        n = next(iter(sizes.values()))
        records = np.empty(n, dtype=self._struct)
        for name, a in arrays.items():
            records[name] = a
        return n, records.tobytes()

    def decode(self, data: bytes, n: int) -> dict[str, np.ndarray]:
        """Packed records -> {field: array of shape (n, *field.shape)} (fresh, writable, native-endian)."""
        if len(data) != n * self.record_size:
            raise SchemaError(
                f"stored data has {len(data)} bytes for {n} records of {self.record_size} bytes: "
                "the table's layout does not match this schema"
            )
        records = np.frombuffer(data, dtype=self._struct, count=n)
        return {f.name: records[f.name].astype(f.dtype.newbyteorder("="), copy=True) for f in self.fields}


def _cast_field(f: Field, value: Any) -> np.ndarray:
    """The field's values as an array of the field's dtype, or a SchemaError saying why not."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"field {f.name!r}: value is not an array ({exc})") from exc
    expected = "(n, " + ", ".join(str(s) for s in f.shape) + ")" if f.shape else "(n,)"
    if arr.ndim != len(f.shape) + 1 or tuple(arr.shape[1:]) != f.shape:
        raise SchemaError(f"field {f.name!r}: shape {tuple(arr.shape)} does not match {expected} for the schema")
    src, dst = arr.dtype, f.dtype
    if src.kind not in _ALLOWED_KINDS:
        raise SchemaError(f"field {f.name!r}: dtype {src} cannot be stored as {dst.name}")
    if src == dst or np.can_cast(src, dst, casting="safe"):
        out = arr.astype(dst, copy=False)
    elif src.kind in "iu" and dst.kind in "iu":
        info = np.iinfo(dst)
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise SchemaError(
                f"field {f.name!r}: values in [{arr.min()}, {arr.max()}] do not fit {dst.name} [{info.min}, {info.max}]"
            )
        out = arr.astype(dst)
    elif src.kind == "f" and dst.kind == "f":
        with np.errstate(over="ignore"):
            out = arr.astype(dst)
        if np.any(np.isinf(out) & np.isfinite(arr)):
            raise SchemaError(f"field {f.name!r}: values overflow {dst.name} (largest {np.finfo(dst).max})")
    elif src.kind in "iu" and dst.kind == "f":
        out = arr.astype(dst)
    else:
        raise SchemaError(
            f"field {f.name!r}: dtype {src.name} cannot be cast safely to {dst.name} "
            f"({'would truncate' if dst.kind in 'iu' else 'only bool converts to bool'})"
        )
    if f.finite and not np.all(np.isfinite(out)):
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise SchemaError(f"field {f.name!r}: {bad} NaN/inf value(s) in a field declared finite")
    return out
