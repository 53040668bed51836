"""The store: the one SQLite file holding points, ledger, budgets and state, and everything that touches it."""

from .buffer import (
    Buffer,
    Committed,
    DeliveryPath,
    QueuedPoint,
    Settled,
    lock_path,
    running_pid,
    token_hash,
)
from .errors import (
    IngestFailedError,
    StoreBusyError,
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreLockedError,
)
from .lease import Budget
from .recovery import Progress, Recovery
from .schema import (
    BUSY_TIMEOUT_MS,
    LEDGER_FIELDS,
    META_HELD_UNSTAMPED,
    META_INGEST_FAILED,
    META_RECOVERIES,
    META_RECOVERY,
    SCHEMA_VERSION,
)
from .writer import OpKind, ResendKey

__all__ = [
    "BUSY_TIMEOUT_MS",
    "LEDGER_FIELDS",
    "META_HELD_UNSTAMPED",
    "META_INGEST_FAILED",
    "META_RECOVERIES",
    "META_RECOVERY",
    "SCHEMA_VERSION",
    "Budget",
    "Buffer",
    "Committed",
    "DeliveryPath",
    "IngestFailedError",
    "OpKind",
    "Progress",
    "QueuedPoint",
    "Recovery",
    "ResendKey",
    "Settled",
    "StoreBusyError",
    "StoreClosedError",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "lock_path",
    "running_pid",
    "token_hash",
]
