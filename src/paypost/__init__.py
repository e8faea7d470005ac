"""paypost: post authorized payments into customer accounts in near real time.

An event-driven pipeline (duplicate check, ISO 20022 standardization, enrichment, rules,
buffered posting into a double-entry ledger, reconciliation) that is exactly-once in effect.
See docs/architecture.md.
"""

__version__ = "0.1.0"
