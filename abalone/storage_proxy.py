"""Optuna's gRPC storage proxy in front of a study database: the workers of a large fleet talk to
it (`hydra.sweeper.storage=grpc://HOST:PORT`) instead of each holding database connections and
re-reading the study's trials; it holds one connection pool and one trial cache for all of them.

    python -m abalone.storage_proxy postgresql+psycopg2://optuna@db-host/optuna --host 10.0.0.5

It speaks plain gRPC without authentication: bind it to loopback or a private subnet only. Keep a
database password out of the URL (and so out of `ps`): libpq reads PGPASSWORD or ~/.pgpass.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

import optuna

from abalone.redact import redact
from abalone.sweep.lock import quiet_marker_studies
from abalone.study.storage import make_storage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m abalone.storage_proxy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("database", help="the study database's SQLAlchemy URL "
                        "(postgresql+psycopg2://USER@HOST/DB)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=13000)
    parser.add_argument("--threads", type=int, default=16,
                        help="requests served at once (each may hold a database connection)")
    args = parser.parse_args(argv)
    if "://" not in args.database or args.database.startswith("grpc://"):
        parser.error(f"database: {redact(args.database)} is not a database URL; the proxy "
                     "serves an SQLAlchemy URL such as postgresql+psycopg2://USER@HOST/DB")
    # get_storage adds Optuna's cache of finished trials, so the proxy reads each trial once.
    storage = optuna.storages.get_storage(make_storage(args.database))
    quiet_marker_studies()  # its clients' locks are marker studies (abalone/sweep/lock.py)
    print(f"Optuna storage proxy for {redact(args.database)} on grpc://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    try:
        optuna.storages.run_grpc_proxy_server(storage, host=args.host, port=args.port,
                                              thread_pool=ThreadPoolExecutor(args.threads))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
