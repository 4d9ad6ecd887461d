"""The bench's server handling: a stopped system leaves nothing running that the next one's
figures would count as "other processes"."""

from __future__ import annotations

import os
import select
import sys

from bench.servers import SystemSpec, launch

# A main process with a child that ignores SIGTERM, as LitServe's inference worker does: the child
# reports its pid through the FIFO once its SIGTERM is ignored; the main process then waits for
# its own SIGTERM. ``launch`` appends ``--port N``, which neither reads.
STUBBORN = """
import signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import os, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "os.write(1, b'x'); signal.pause()"], stdout=subprocess.PIPE)
child.stdout.read(1)
with open(sys.argv[1], "w") as fifo:
    fifo.write(str(child.pid))
signal.pause()
"""
EXIT_DEADLINE_S = 30  # a safety net: the child is killed at once, or never


def test_stop_kills_what_of_the_process_group_outlives_the_main_process(tmp_path):
    fifo = tmp_path / "child.pid"
    os.mkfifo(fifo)
    server = launch(SystemSpec("stubborn", [sys.executable, "-c", STUBBORN, str(fifo)], "/"), tmp_path)
    with open(fifo) as reader:  # blocks until the main process has started its child
        child = int(reader.read())
    exited = os.pidfd_open(child)  # readable once the child has exited
    try:
        server.stop()
        assert server.process.returncode is not None
        readable, _, _ = select.select([exited], [], [], EXIT_DEADLINE_S)
        assert readable, "the child that ignores SIGTERM still runs after stop()"
    finally:
        os.close(exited)
