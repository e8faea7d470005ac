"""Distributed mode (issue 6): NATS JetStream carries the events, PostgreSQL holds the ledger
and every stage's state, stateless workers scale out. See docs/deployment.md."""
