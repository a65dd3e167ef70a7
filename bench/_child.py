"""Run a command and write its own peak RSS and CPU time as JSON: `python _child.py OUT.json CMD...`.

Why an intermediate process: on Linux, exec keeps the larger of the old and the new image's peak RSS
(`ru_maxrss`), so a child started straight from the bench process (hundreds of MiB after generating
photos) would report the bench's size, not its own. Started from this small process, it reports its own.
Run as a script (not `-m`): it imports nothing from the project.
"""

import json
import os
import subprocess
import sys


def main() -> int:
    out, *command = sys.argv[1:]
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(out, "w") as f:
        json.dump({"returncode": code, "maxrss_kib": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}, f)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
