#!/usr/bin/env python3
"""Install only the Ansible collections the playbooks use, copied from the pinned `ansible`
wheel (the whole bundle is ~470 MB of collections, these are ~40 MB; Ansible Galaxy may not be
reachable). Usage: install-collections.py WHEEL SITE_PACKAGES NS/NAME [NS/NAME ...]"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    wheel, site, wanted = Path(argv[0]), Path(argv[1]), argv[2:]
    root = site / "ansible_collections"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for coll in wanted:
            prefix = f"ansible_collections/{coll}/"
            members = [n for n in names if n.startswith(prefix)]
            if not any(n == prefix + "MANIFEST.json" for n in members):
                print(f"collection {coll} is not in {wheel.name}", file=sys.stderr)
                return 1
            shutil.rmtree(root / coll, ignore_errors=True)
            tmp = site / f".ttg-{coll.replace('/', '-')}"
            shutil.rmtree(tmp, ignore_errors=True)
            zf.extractall(tmp, members)
            (root / coll).parent.mkdir(parents=True, exist_ok=True)
            (tmp / prefix).rename(root / coll)
            shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
