"""Distributed throughput: generated authorizations → NATS JetStream + PostgreSQL → ledger.

    .venv/bin/python bench/bench_distributed.py --events 50000 --workers 2 --fused

Starts WORKERS `paypost serve --backend distributed` processes, ingests the generated logs
(this process is the publisher), waits until every approved authorization is in a terminal
state, checks the answer (complete, one journal entry per posted authorization, zero trial
balance) BEFORE printing any figure, then deletes the run's streams and schemas. Generation
is not timed. Needs the services of docs/deployment.md (PAYPOST_BUS_URL, PAYPOST_DB_URL).
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from paypost.bench import service_cpu_s
from paypost.demo import demo_inputs
from paypost.distributed.runtime import (
    DistributedJob,
    destroy,
    ingest_sources,
    load_settings,
    wait_for_completion,
)

KEY = bytes(range(32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument("--fused", action="store_true", help="serve --fused")
    ap.add_argument(
        "--concurrency", type=int, default=None, help="serve --concurrency (batches in flight)"
    )
    ap.add_argument("--mode", default="batch")
    args = ap.parse_args()
    settings = load_settings(prefix=f"bench_{uuid.uuid4().hex[:8]}")
    with demo_inputs(args.events, KEY, seed=1, mode=args.mode) as inputs:
        job = DistributedJob.with_default_rules(
            settings,
            inputs.generated.refdata,
            KEY,
            mode=args.mode,
            in_process_workers=False,
        )
        env = dict(os.environ)
        env.update(
            PAYPOST_BUS_URL=settings.bus_url,
            PAYPOST_DB_URL=settings.db_url,
            PAYPOST_PREFIX=settings.prefix,
            PAYPOST_VAULT_KEY=base64.b64encode(KEY).decode(),
        )
        logdir = Path("/tmp") / settings.prefix
        logdir.mkdir(exist_ok=True)
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, "-c", "from paypost.cli import main; main()", "serve"),
                    *("--backend", "distributed", "--data-dir", str(logdir / f"w{i}")),
                    "--fused" if args.fused else "--per-stage",
                    *(("--concurrency", str(args.concurrency)) if args.concurrency else ()),
                ],
                env=env,
                stdout=(logdir / f"w{i}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            for i in range(args.workers)
        ]
        peak = 0.0
        worker_cpu = {p.pid: 0.0 for p in procs}
        services_before = service_cpu_s()
        try:
            time.sleep(3)  # let the workers load the configuration (not timed)
            for p in procs:
                t = psutil.Process(p.pid).cpu_times()
                worker_cpu[p.pid] = -(t.user + t.system)
            own_before = resource.getrusage(resource.RUSAGE_SELF)
            services_before = service_cpu_s()
            started = time.perf_counter()
            sources = [(s.config, s.path) for s in inputs.sources if s.path is not None]
            ingest_sources(job.pipeline, sources, job.keys)
            ingest_s = time.perf_counter() - started
            approved = job.pipeline.ingest_totals()["approved"]

            cpu_seen = {p.pid: 0.0 for p in procs}

            def on_poll(rep: object) -> None:
                nonlocal peak
                rss = 0
                for p in procs:
                    proc = psutil.Process(p.pid)
                    rss += proc.memory_info().rss
                    t = proc.cpu_times()
                    cpu_seen[p.pid] = t.user + t.system
                peak = max(peak, rss / 2**20)

            rep = wait_for_completion(
                job.pipeline, started, approved, timeout_s=3600, poll_s=1.0, on_poll=on_poll
            )
            own_after = resource.getrusage(resource.RUSAGE_SELF)
            services = service_cpu_s()
            load = os.getloadavg()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
            job.close()
        ok = (
            rep.complete
            and rep.trial_balance_zero
            and rep.posted == rep.journal_entries
            and rep.terminal() == rep.approved
        )
        destroy(settings)
    if not ok:
        print(f"WRONG ANSWER, no figure: {rep}")
        sys.exit(1)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per = 1e6 / rep.approved
    workers_s = sum(cpu_seen[pid] + worker_cpu[pid] for pid in cpu_seen)
    publisher_s = (own_after.ru_utime + own_after.ru_stime) - (
        own_before.ru_utime + own_before.ru_stime
    )
    nats_s = services["nats-server"] - services_before["nats-server"]
    pg_s = services["postgresql"] - services_before["postgresql"]
    total_s = workers_s + publisher_s + nats_s + pg_s
    print(
        f"events={args.events} approved={rep.approved} posted={rep.posted} "
        f"workers={args.workers} fused={args.fused} mode={args.mode}\n"
        f"ingest (publisher) {ingest_s:.1f} s; end to end {rep.seconds:.1f} s = "
        f"{rep.approved / rep.seconds:,.0f} approved authorizations/s\n"
        f"peak RSS: workers {peak:.0f} MB (sum), publisher {own:.0f} MB\n"
        f"CPU per approved authorization: {total_s * per:,.0f} us = workers "
        f"{workers_s * per:,.0f} + publisher {publisher_s * per:,.0f} + nats-server "
        f"{nats_s * per:,.0f} + PostgreSQL {pg_s * per:,.0f} (budget for 1M in 5 min on 2 "
        f"cores: 600 us)\nload average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )


if __name__ == "__main__":
    main()
