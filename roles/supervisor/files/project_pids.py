#!/usr/bin/env python3
"""Print, as JSON, the processes started by the project's supervisord, alive or orphaned.

supervisord puts SUPERVISOR_SERVER_URL=unix://<its socket> into the environment of every
program it starts, and their children inherit it: that entry, with the socket of this state
dir, is what selects a process. Only the caller's own processes are read; the caller and its
ancestors are never listed; nothing is signalled here.

    project_pids.py <supervisor socket path>
"""

from __future__ import annotations

import json
import os
import sys


def ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def main(socket: str) -> None:
    markers = {f"SUPERVISOR_SERVER_URL=unix://{p}".encode()
               for p in (socket, os.path.normpath(socket), os.path.realpath(socket))}
    skip, uid, found = ancestors(), os.getuid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = set(f.read().split(b"\0"))
            if not markers & environ:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmdline:  # an empty command line is a zombie: already gone
            found.append({"pid": int(name), "cmdline": cmdline[:200]})
    print(json.dumps(sorted(found, key=lambda p: p["pid"])))


if __name__ == "__main__":
    main(sys.argv[1])
