"""An independent policy scanner over every rendered manifest: checkov must report 0 failed
checks. Where a check is wrong for a component, the manifest says why in a
`checkov.io/skipN` annotation (the chaos Job needs its token; images are pinned by tag and
side-loaded on kind). checkov lives outside the project's lock (a large tree of its own):
`.ci/run` installs it into its own venv and sets TTG_CHECKOV."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest


def checkov() -> str:
    path = os.environ.get("TTG_CHECKOV") or shutil.which("checkov")
    if not path or not Path(path).exists():
        pytest.skip("checkov is not installed (python3 -m venv /tmp/checkov-venv && "
                    "/tmp/checkov-venv/bin/pip install checkov; TTG_CHECKOV=<its bin/checkov>)")
    return path


@pytest.mark.timeout(900)
def test_checkov_reports_no_failed_check(render_dir: Path) -> None:
    out = subprocess.run([checkov(), "-d", str(render_dir), "--framework", "kubernetes",
                          "--compact", "-o", "json"],
                         capture_output=True, text=True, timeout=850, check=False)
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    results = [r.get("results", {}) for r in reports]
    failed = [f for r in results for f in r.get("failed_checks", [])]
    skipped = [f for r in results for f in r.get("skipped_checks", [])]
    summary = Counter(f"{f['check_id']} {f['resource']}" for f in failed)
    assert sum(r["summary"]["failed"] for r in reports) == 0 and not failed, (
        f"{len(failed)} failed: {dict(summary)}")
    assert sum(r["summary"]["passed"] for r in reports) > 1000  # it did scan the manifests
    assert sum(r["summary"]["parsing_errors"] for r in reports) == 0
    # every skip carries its reason, in the manifest's checkov.io/skipN annotation
    # (checkov's JSON keeps it in check_result; "No comment provided" is what it says without)
    comments = [s.get("check_result", {}).get("suppress_comment") for s in skipped]
    assert skipped and all(c and c != "No comment provided" for c in comments), comments
