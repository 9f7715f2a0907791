"""Start-up watchdog for multi-worker strategies (see `tfbn.distribute.multi_worker_strategy`).

`tf.distribute.MultiWorkerMirroredStrategy()` waits for its peers inside C++ while
holding Python's GIL, so no thread of the waiting process can time it out. This
module runs as a separate small process (no TensorFlow import):

    python path/to/tfbn/_watchdog.py PARENT_PID TIMEOUT_S TASK PEERS_JSON

It waits until its stdin closes (the parent connected, or exited) or TIMEOUT_S
passes; then it writes which peers accept no TCP connection to stderr and ends the
parent with SIGKILL (the waiting constructor ignores SIGTERM).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys


def unreachable_peers(peers, timeout: float = 2.0) -> list[tuple[str, int, str, str]]:
    """The `(job, index, "host:port")` peers whose address accepts no TCP connection,
    each with the reason: `(job, index, address, reason)`."""
    dead = []
    for job, index, address in peers:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except (OSError, ValueError) as error:
            dead.append((job, index, address, str(error) or type(error).__name__))
    return dead


def describe_peers(peers, timeout: float = 2.0) -> str:
    """One sentence naming the unreachable peers (or saying that all answer)."""
    dead = unreachable_peers(peers, timeout)
    if not dead:
        return "every peer accepts connections (a peer may be alive but stuck or restarted)"
    return "; ".join(
        f"{job} {index} at {address} is not reachable ({reason})"
        for job, index, address, reason in dead
    )


def main(argv: list[str]) -> int:
    parent, timeout, task, peers = int(argv[0]), float(argv[1]), argv[2], json.loads(argv[3])
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if ready:
        return 0  # connected (the parent closed the pipe) or the parent is gone
    sys.stderr.write(
        f"tfbn: {task} could not form the MultiWorkerMirroredStrategy cluster within "
        f"{timeout:g} s: {describe_peers(peers)}. Ending process {parent}.\n"
    )
    sys.stderr.flush()
    try:
        os.kill(parent, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
