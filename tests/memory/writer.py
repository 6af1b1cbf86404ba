"""Child process for the crash tests: saves turns and snapshots in a loop until killed.

    python tests/memory/writer.py DB BLOB_DIR N [SESSION]
Turn i (1-based) of session SESSION (default "crash") carries snapshot BLOB_DIR/k.snap, k = (i - 1) % K + 1 for
the K files there; after each commit the child appends i to DB.SESSION.log.
"""

import sys
from pathlib import Path

from deltamem.memory.store import Store

db, blob_dir, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
title = sys.argv[4] if len(sys.argv) > 4 else "crash"
store = Store(db)
sid = store.session(title)["id"]
blobs = [p.read_bytes() for p in sorted(blob_dir.glob("*.snap"), key=lambda p: int(p.stem))]
done = len(store.turns(sid))
log = open(f"{db}.{title}.log", "a")
for i in range(done + 1, n + 1):
    store.save_turn(sid, [{"role": "user", "text": f"turn {i}", "tokens": 16}], blobs[(i - 1) % len(blobs)])
    log.write(f"{i}\n")
    log.flush()
