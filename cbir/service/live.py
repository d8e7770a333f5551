"""The index a request is answered from: the committed version, switched to a newer one between batches.

Every writer (`cbir index --add/--remove`, `cbir sync`, the service's own edits) commits an index by pointing
its link at a new version folder in one rename, so a link read is the whole freshness check: microseconds,
done before each batch. A batch takes one Querier and keeps it to the end, so it sees the old index or the
new one, never a mix."""

from __future__ import annotations

import logging
import os
import threading

from .. import CbirError
from ..retrieval.query import Querier

log = logging.getLogger(__name__)


class LiveQuerier:
    def __init__(self, querier: Querier):
        self._querier = querier
        self._link = querier.layout.path(querier.layout.index(querier.si.name))
        self._version = self._committed()
        self._lock = threading.Lock()
        self.problem: str | None = None  # why the newest version could not be opened (readiness says so)
        self._refused: str | None = None  # that version: not retried on every request

    def _committed(self) -> str | None:
        try:
            return os.readlink(self._link)
        except OSError:
            return None

    @property
    def version(self) -> str | None:
        return self._version

    def current(self) -> Querier:
        """The querier over the index as committed now (reloaded when a writer has committed since)."""
        version = self._committed()
        if version in (self._version, self._refused):
            return self._querier
        with self._lock:
            if version != self._version:
                try:
                    self._querier = self._querier.reloaded()
                    self._version, self.problem, self._refused = version, None, None
                    log.info("index %s: switched to version %s (%d vectors)", self._querier.si.name, version,
                             self._querier.si.manifest["count"])
                except CbirError as e:  # e.g. a rebuild changed its spec beyond this server's models: keep serving
                    self.problem, self._refused = str(e), version
                    log.warning("index version %s not opened, still serving %s: %s", version, self._version, e)
            return self._querier
