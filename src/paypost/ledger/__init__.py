"""The double-entry ledger (issue 3): model in `model`, stores in `sqlite` and `postgres`.

See docs/ledger.md. The names most callers need are re-exported here.
"""

from paypost.ledger.model import (
    Account,
    Balance,
    JournalEntry,
    LedgerError,
    LedgerStore,
    Leg,
    PostedEntry,
    PostResult,
    TrialBalance,
    fx_legs,
    reversal_id,
)

__all__ = [
    "Account",
    "Balance",
    "JournalEntry",
    "LedgerError",
    "LedgerStore",
    "Leg",
    "PostResult",
    "PostedEntry",
    "TrialBalance",
    "fx_legs",
    "reversal_id",
]
