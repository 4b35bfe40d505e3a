"""A Redis stand-in for the local argilla-server (runs inside ``.venv-argilla``).

argilla-server pings Redis at start-up and uses it (through ``rq``) as the
queue of background jobs.  ``fakeredis.TcpFakeServer`` speaks the Redis
protocol from process memory, which is all the local server needs.

    python fake_redis.py --host 127.0.0.1 --port 0 --port-file PATH [--parent-pid PID]

``--port 0`` picks a free port; the bound port is written to ``--port-file``
once the server accepts connections.  With ``--parent-pid`` it exits when that
process is gone.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

from fakeredis import TcpFakeServer


def main() -> None:
    """Serve an in-memory Redis on the given port until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args()

    server = TcpFakeServer((args.host, args.port))
    server.daemon_threads = True  # do not wait for client connections on exit

    def stop(*_: object) -> None:
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.parent_pid:

        def watch() -> None:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(args.parent_pid, 0)
                except ProcessLookupError:
                    os._exit(0)
                except PermissionError:
                    pass

        threading.Thread(target=watch, daemon=True).start()

    port = server.server_address[1]
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(args.port_file)
    print(f"fake redis listening on {args.host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
