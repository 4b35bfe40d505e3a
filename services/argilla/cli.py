"""The local Argilla's command line (``python -m services.argilla ...``; `make argilla-ui` uses it)::

    serve --data-dir DIR [--port 6900]   # foreground until Ctrl-C, prints the UI address + where the login is
    start --data-dir DIR [--port 6900]   # detached; pid file in DIR
          [--host ADDR --expose-on-network-insecure]   # a non-loopback address needs the flag
    stop  --data-dir DIR
    status --data-dir DIR
    ensure-venv
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

from services.argilla.credentials import login_hint
from services.argilla.exposure import EXPOSE_FLAG, check_bind_address, is_loopback
from services.argilla.local_server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_START_TIMEOUT_S,
    STOP_COMMAND,
    read_running,
    start_local_argilla,
    stop_local_argilla,
)
from services.argilla.processes import LocalArgillaError
from services.argilla.venv import REPO_ROOT, VENV_DIRNAME, ensure_venv


def describe(info: dict) -> str:
    """Where the server is and where its login is (UI and SDK)."""
    reach = "this machine only" if is_loopback(info.get("host", DEFAULT_HOST)) else "EXPOSED to the network"
    return (
        f"Argilla UI:  {info['url']}   ({reach})\n"
        f"  login:     {login_hint(info)}\n"
        f"  SDK:       argilla.Argilla(api_url={info['url']!r}, api_key=<api_key from that file>)\n"
        f"  server log: {info.get('log_file')}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = argparse.ArgumentParser(
        prog="python -m services.argilla",
        description="Local argilla-server 2.8 with an in-memory search engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("serve", "run in the foreground until Ctrl-C"),
                           ("start", "start detached (pid file in the data dir)")):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("--data-dir", type=Path, required=True)
        command.add_argument("--port", type=int, default=DEFAULT_PORT,
                             help="0 picks a free port (default %(default)s)")
        command.add_argument("--host", default=DEFAULT_HOST,
                             help=f"address to bind (default %(default)s); any other than loopback needs {EXPOSE_FLAG}")
        command.add_argument(EXPOSE_FLAG, dest="expose_on_network", action="store_true",
                             help="allow a non-loopback --host: anyone who can reach it may try the login")
        command.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT_S)
    for name, helptext in (("stop", "stop a detached server"), ("status", "is a server running on the data dir")):
        sub.add_parser(name, help=helptext).add_argument("--data-dir", type=Path, required=True)
    sub.add_parser("ensure-venv", help=f"create/update {VENV_DIRNAME} from the lock file")
    return parser


def start(args: argparse.Namespace, detach: bool):
    """Start the server as the arguments say."""
    return start_local_argilla(args.data_dir, args.port, host=args.host, expose_on_network=args.expose_on_network,
                               timeout=args.timeout, detach=detach)


def command_start(args: argparse.Namespace) -> int:
    """Start detached, unless one already runs on the data dir; print how to reach and stop it."""
    check_bind_address(args.host, args.expose_on_network)
    info = read_running(args.data_dir)
    if info is None:
        print("setting up argilla venv ...", flush=True)
        ensure_venv(REPO_ROOT, quiet=False)
        print("starting argilla ...", flush=True)
        start(args, detach=True)
        info = read_running(args.data_dir)
    else:
        print("already running")
    print(describe(info))
    print(f"stop with: {STOP_COMMAND} --data-dir {args.data_dir}")
    return 0


def command_serve(args: argparse.Namespace) -> int:
    """Serve in the foreground until Ctrl-C or SIGTERM."""
    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    check_bind_address(args.host, args.expose_on_network)
    ensure_venv(REPO_ROOT, quiet=False)
    server = start(args, detach=False)
    print(describe(read_running(args.data_dir)))
    print("Press Ctrl-C to stop.", flush=True)
    try:
        while server.is_running():
            time.sleep(1.0)
        print(f"argilla exited unexpectedly; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping argilla ...", flush=True)
        return 0
    finally:
        server.stop()


def command_stop(args: argparse.Namespace) -> int:
    """Stop the detached server on the data dir, if any."""
    stopped = stop_local_argilla(args.data_dir)
    print("argilla stopped" if stopped else f"no argilla server running on {args.data_dir}")
    return 0


def command_status(args: argparse.Namespace) -> int:
    """Exit 0 and describe the server if one runs on the data dir, else exit 1."""
    info = read_running(args.data_dir)
    if info is None:
        print(f"no argilla server running on {args.data_dir}")
        return 1
    print(describe(info))
    return 0


def command_ensure_venv(args: argparse.Namespace) -> int:
    """Create or update the server's virtualenv."""
    started = time.monotonic()
    venv_dir = ensure_venv(REPO_ROOT, quiet=False)
    print(f"{venv_dir} ready ({time.monotonic() - started:.1f}s)")
    return 0


COMMANDS = {"start": command_start, "serve": command_serve, "stop": command_stop, "status": command_status,
            "ensure-venv": command_ensure_venv}


def main(argv: Optional[List[str]] = None) -> int:
    """Parse and run one command."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LocalArgillaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
