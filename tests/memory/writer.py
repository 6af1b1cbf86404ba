"""Child process for the crash tests: saves turns and snapshots in a loop until killed.

    python tests/memory/writer.py DB BLOB_DIR N [SESSION]
Turn i (1-based) of session SESSION (default "crash") carries snapshot BLOB_DIR/k.snap, k = (i - 1) % K + 1 for
the K files there; after each commit the child appends i to DB.SESSION.log.

    python tests/memory/writer.py --fork
A fork server, so that hundreds of writers cost one start-up: each line "DB BLOB_DIR N SESSION" on stdin forks a
writer (the loop above, in a child of this process) and prints its pid; "wait PID" reaps it and prints how it
ended (a negative number: killed by that signal).
"""

import os
import sys
from pathlib import Path

from deltamem.memory.store import Store


def write(db: str, blob_dir: Path, n: int, title: str) -> None:
    store = Store(db)
    sid = store.session(title)["id"]
    blobs = [p.read_bytes() for p in sorted(blob_dir.glob("*.snap"), key=lambda p: int(p.stem))]
    done = len(store.turns(sid))
    log = open(f"{db}.{title}.log", "a")
    for i in range(done + 1, n + 1):
        store.save_turn(sid, [{"role": "user", "text": f"turn {i}", "tokens": 16}], blobs[(i - 1) % len(blobs)])
        log.write(f"{i}\n")
        log.flush()


def serve() -> None:
    for line in sys.stdin:
        words = line.split()
        if words[0] == "wait":
            _, status = os.waitpid(int(words[1]), 0)
            print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
            continue
        pid = os.fork()
        if pid == 0:  # the writer: no connection was open before the fork
            try:
                write(words[0], Path(words[1]), int(words[2]), words[3])
            finally:
                os._exit(0)
        print(pid, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--fork":
        serve()
    else:
        write(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "crash")
