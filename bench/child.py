"""Run a command and print its wall seconds and peak RSS as JSON: ``python bench/child.py CMD [ARG ...]``.

The command's own output goes to stderr, so that stdout holds only the JSON line.

Linux carries a process's peak RSS across fork and exec, so a child of the (large) benchmark process would
report at least the benchmark's own RSS. Started from this small launcher, a stage's peak is its own.
"""

import json
import os
import subprocess
import sys
import time

began = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=sys.stderr)
_, status, usage = os.wait4(child.pid, 0)
seconds = time.perf_counter() - began
child.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"seconds": seconds, "maxrss_kib": usage.ru_maxrss, "returncode": child.returncode}))
