"""`--filter`: a small, checked subset of Milvus boolean expressions over an index's scalar fields.

Milvus evaluates the expression itself; every other store (FAISS) evaluates the same text on the index's
metadata table and searches only the matching ids (exact pre-filtering, no over-fetch guesswork). The
subset — comparisons, `in` / `not in` lists, `and` / `or` / `not`, `&&` / `||`, parentheses — reads the
same in both, so a filter never means one thing in one store and another in the other.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .. import CbirError

FIELDS = ("id", "image_id", "instance", "class_id", "category_id", "split", "source", "score", "path")
TOKEN = re.compile(r"""\s*(?:(?P<number>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<string>'[^'\\]*'|"[^"\\]*")|"""
                   r"""(?P<op>==|!=|<=|>=|<|>|&&|\|\||\(|\)|\[|\]|,)|(?P<word>[A-Za-z_][A-Za-z0-9_]*))""")
WORDS = {"and": "and", "or": "or", "not": "not", "in": "in", "AND": "and", "OR": "or", "NOT": "not", "IN": "in"}
SPELLING = {"&&": "and", "||": "or"}
EXAMPLE = {"image_id": 1, "instance": 0, "class_id": 1, "category_id": 1, "split": "test", "source": "detected",
           "score": 1.0, "path": "a.jpg"}  # a value of each field's type (id is the index)


def _tokens(expression: str) -> list[tuple[str, str]]:
    out, at = [], 0
    text = expression.rstrip()
    while at < len(text):
        m = TOKEN.match(text, at)
        if not m:
            raise CbirError(f"--filter {expression!r}: cannot read {text[at:].strip()[:20]!r} (supported: field == "
                            f"value, !=, <, <=, >, >=, in [..], not in [..], and, or, not, parentheses)")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        at = m.end()
    return out


def to_pandas(expression: str) -> str:
    """The expression checked token by token and spelled for `DataFrame.query`."""
    parts, depth = [], 0
    for kind, text in _tokens(expression):
        if kind == "word":
            if text in WORDS:
                text = WORDS[text]
            elif text not in FIELDS:
                raise CbirError(f"--filter {expression!r}: unknown field {text!r}; fields: {', '.join(FIELDS)}")
        elif kind == "op":
            depth += {"(": 1, ")": -1, "[": 1, "]": -1}.get(text, 0)
            text = SPELLING.get(text, text)
        parts.append(text)
    if depth != 0 or not parts:
        raise CbirError(f"--filter {expression!r}: unbalanced brackets or empty expression")
    return " ".join(parts)


def matching_ids(table: pd.DataFrame, expression: str) -> np.ndarray:
    """Store ids of the rows (table indexed by id) that satisfy the expression."""
    query = to_pandas(expression)
    try:
        mask = table.eval(query, engine="python")
    except Exception as e:  # pandas raises many kinds for a malformed or mistyped expression
        raise CbirError(f"--filter {expression!r}: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(mask, pd.Series) or mask.dtype != bool:
        raise CbirError(f"--filter {expression!r}: is not a true/false condition")
    return table.index[mask.to_numpy()].to_numpy(np.int64)


def check_expression(expression: str) -> str:
    """The expression tried on one row of each field's type, so a syntax or type slip is refused before
    any photo is read (what a real index then matches is its own business)."""
    row = pd.DataFrame({field: [EXAMPLE[field]] for field in FIELDS if field != "id"}, index=pd.Index([0], name="id"))
    matching_ids(row, expression)
    return expression
