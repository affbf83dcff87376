"""``make chaos``: the full chaos run, on MariaDB and on PostgreSQL sources.

    .venv/bin/python tests/chaos/run.py --kills 100

Splits the kills between the sources (MariaDB -> capture -> NATS -> apply -> PostgreSQL engine,
then the same from a PostgreSQL source), prints a line per source and then the one line of the
whole run::

    kills=N restarts=N changes=N lost=0 divergent=0 out_of_order=0 inactive=0

Exit code 0 only if lost, divergent, out_of_order and inactive are all 0 and ``optsync
reconcile`` finds no drift either (1 otherwise, 2 for bad usage).
The definitions are in harness.py and docs/reliability.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ChaosPlan, Figures, run_chaos

SOURCES = ("mariadb", "postgres")


def say(text: str) -> None:
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kills",
        type=int,
        default=100,
        help="SIGKILLs of capture/apply/serve in the whole run, split between the sources "
        "[default: 100]",
    )
    parser.add_argument(
        "--restarts",
        type=int,
        default=3,
        help="restarts of the source database and of nats-server, each, per source [default: 3]",
    )
    parser.add_argument(
        "--sources",
        default=",".join(SOURCES),
        help="comma-separated source kinds to run [default: mariadb,postgres]",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed [default: 1]")
    parser.add_argument(
        "--rows", type=int, default=300, help="source rows kept in the table [default: 300]"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs folder and print it")
    args = parser.parse_args()
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        parser.error(f"--sources: unknown {', '.join(unknown) or '(none)'}; use mariadb,postgres")
    if args.kills < len(sources) or args.restarts < 0:
        parser.error("--kills must be at least one per source and --restarts not negative")
    logs = Path(tempfile.mkdtemp(prefix="optsync-chaos-"))
    say(f"machine: {platform.node()} {platform.machine()} python {platform.python_version()}")
    total = Figures()
    clean = True
    share, extra = divmod(args.kills, len(sources))
    for index, kind in enumerate(sources):
        plan = ChaosPlan(
            source=kind,
            kills=share + (1 if index < extra else 0),
            source_restarts=args.restarts,
            nats_restarts=args.restarts,
            rows=args.rows,
            seed=args.seed + index,
            catch_up=180.0,
        )
        folder = logs / kind
        folder.mkdir()
        figures = run_chaos(plan, folder, say)
        say(f"{kind}: {figures.line()} {figures.detail()}")
        say(f"  optsync reconcile: {figures.reconcile_said}")
        for problem in figures.problems:
            say(f"  {problem}")
        total.add(figures)
        clean = clean and figures.clean
    if args.keep or not clean:
        say(f"logs: {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
    say(total.line())
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
