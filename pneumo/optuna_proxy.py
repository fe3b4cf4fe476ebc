"""Optuna's gRPC storage proxy in front of one database, for tune workers on many machines.

Run it once, next to the database::

    python -m pneumo.optuna_proxy --storage postgresql://optuna:PASSWORD@db-host/optuna --port 13000

and point every worker at it with ``-P storage=grpc://proxy-host:13000``: the workers then hold
no database connection each (only the proxy does) and need no database driver. The proxy
listens without TLS or authentication: keep it on a private network. Trials of workers behind
the proxy have no heartbeats (Optuna's proxy does not carry them), so a killed worker's trial stays
running; Optuna does not proxy a journal file either.
"""

from __future__ import annotations

import argparse
import logging

import optuna

from pneumo.tuning import GRPC_PREFIX, JOURNAL_PREFIX, open_storage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="the database, a SQLAlchemy URL (not journal:, not grpc:)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=13000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.storage.startswith((JOURNAL_PREFIX, GRPC_PREFIX)):
        parser.error("the proxy serves a database (Optuna's proxy does not support journal storage)")
    # open_storage returns Optuna's cached wrapper, which the proxy needs to be fast.
    optuna.storages.run_grpc_proxy_server(open_storage(args.storage), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
