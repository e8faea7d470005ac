"""`paypost demo`: realistic synthetic inputs for the whole pipeline (the main job).

Tenants, accounts with valid IBANs and sort codes, cards linked to them (tokenized with the
data dir's vault key), and ISO 8583 authorization logs per tenant: merchants with real
category codes, several currencies, about 1% duplicates, some declines, some foreign and
high-value transactions, a few without an issuing country (which the rules reject).

Everything is derived from a seed, so a second run on the same data dir regenerates the
very same inputs and resumes from the checkpoints: nothing is posted twice. The logs hold
clear (test) card numbers, as an upstream authorization system's log would: they are written
to a private temporary directory outside the data dir and deleted when the job ends. Past
ingress, no card number exists anywhere (DESIGN §3.4).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from paypost.iso.generate import generate_authorizations, iso8583_log_lines
from paypost.refdata.generate import GeneratedRefData, generate_refdata
from paypost.runner import Source
from paypost.security.tokens import Tokenizer, VaultKeys
from paypost.stages.ingest import SourceConfig

ACCOUNTS_PER_1000_AUTHS = 20


@dataclass(frozen=True)
class DemoInputs:
    generated: GeneratedRefData
    sources: list[Source]


def demo_refdata(
    events: int, master_key: bytes, seed: int, *, tenants: Collection[str] | None = None
) -> GeneratedRefData:
    """Accounts and cards for EVENTS authorizations (about 50 authorizations per account);
    only TENANTS' records when given (the same records as in the full set)."""
    tokenizer = Tokenizer(VaultKeys.from_master(master_key).token_key)
    n_accounts = max(30, events * ACCOUNTS_PER_1000_AUTHS // 1000)
    return generate_refdata(
        n_accounts,
        seed=seed,
        tokenizer=tokenizer,
        declared=f"demo-{seed}",
        only_tenants=tenants,
    )


@contextmanager
def demo_inputs(
    events: int,
    master_key: bytes,
    *,
    seed: int = 0,
    mode: str = "near-realtime",
    batch_size: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[DemoInputs]:
    """Generate the reference data and one ISO 8583 log per tenant (EVENTS authorizations in
    all); the logs live in a private temporary directory for the duration of the block."""
    generated = demo_refdata(events, master_key, seed)
    cards: dict[str, list[str]] = {}
    for card in generated.cards:
        cards.setdefault(card.tenant, []).append(card.pan)
    homes = {t.id: t.home_currency for t in generated.refdata.tenants.values()}
    tmp = Path(tempfile.mkdtemp(prefix="paypost-upstream-"))
    os.chmod(tmp, 0o700)
    try:
        auths = generate_authorizations(
            cards,
            events,
            seed=seed,
            home_currency=homes,
            per_second=20.0,  # re-logged duplicates come 2–30 s later: inside the log
            decline_rate=0.04,
            duplicate_rate=0.01,
            foreign_rate=0.12,
            high_value_rate=0.005,
            missing_issuer_rate=0.002,
        )
        per_tenant: dict[str, list[object]] = {t: [] for t in sorted(cards)}
        done = 0
        for a in auths:
            per_tenant[a.tenant].append(a)
            done += 1
            if on_progress is not None and done % 5000 == 0:
                on_progress(done)
        if on_progress is not None:
            on_progress(done)
        sources: list[Source] = []
        for tenant, items in per_tenant.items():
            path = tmp / f"{tenant}.iso8583.log"
            with path.open("w", encoding="ascii") as fh:
                for line in iso8583_log_lines(items):  # type: ignore[arg-type]
                    fh.write(line + "\n")
            config = SourceConfig(
                name=f"demo-{seed}-{tenant}",
                tenant=tenant,
                format="iso8583",
                mode=mode,  # type: ignore[arg-type]
                batch_size=batch_size,
            )
            sources.append(Source(config=config, path=path))
        yield DemoInputs(generated=generated, sources=sources)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
