"""API keys with scopes: `read` (search, look up images) and `write` (add and remove photos; includes read).

Keys come from a file (`--keys FILE`, one `KEY SCOPE[,SCOPE]` per line, # comments) or from $CBIR_API_KEYS
(the same entries separated by `;`), which stays out of the process list. A presented key is compared with
every known key in constant time (`hmac.compare_digest`), so neither a match's position nor a common prefix
shows in the answer's timing."""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path

from .. import CbirError

SCOPES = ("read", "write")
KEYS_VARIABLE = "CBIR_API_KEYS"
MIN_KEY = 16  # characters: a short key is guessable


def parse_keys(text: str, source: str, separator: str = "\n") -> dict[str, frozenset[str]]:
    keys: dict[str, frozenset[str]] = {}
    for number, entry in enumerate(text.split(separator), 1):
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        key, _, scopes = entry.partition(" ")
        where = f"{source}: entry {number}"
        names = [s for s in re.split(r"[\s,]+", scopes.strip()) if s]
        if not names or any(s not in SCOPES for s in names):
            raise CbirError(f"{where}: give `KEY SCOPE[,SCOPE]` with scopes from {', '.join(SCOPES)}")
        if len(key) < MIN_KEY:
            raise CbirError(f"{where}: the key has {len(key)} characters; use at least {MIN_KEY} "
                            f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
        keys[key] = frozenset(names) | ({"read"} if "write" in names else set())
    return keys


def load_keys(file: Path | None) -> dict[str, frozenset[str]]:
    """The keys of `--keys FILE` and $CBIR_API_KEYS together (none: the service asks for no key)."""
    keys = {}
    if file is not None:
        try:
            text = Path(file).read_text()
        except OSError as e:
            raise CbirError(f"--keys {file}: {e.strerror}") from None
        keys.update(parse_keys(text, f"--keys {file}"))
        if not keys:
            raise CbirError(f"--keys {file}: no keys in it")
    if os.environ.get(KEYS_VARIABLE):
        keys.update(parse_keys(os.environ[KEYS_VARIABLE], f"${KEYS_VARIABLE}", ";"))
    return keys


def scopes_of(keys: dict[str, frozenset[str]], presented: str) -> frozenset[str] | None:
    """The scopes of a presented key, or None for an unknown one; every known key is compared."""
    found = None
    given = presented.encode()
    for key, scopes in keys.items():
        if hmac.compare_digest(key.encode(), given):
            found = scopes
    return found
