"""`ttg image`: the worker image's build context with the user's code, tagged by content."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ttg.image import content_tag, stage

WORKER = Path(__file__).resolve().parents[1]


def test_the_tag_follows_the_content_of_the_code(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "sim.py").write_text("def run(p):\n    return p\n")
    first = content_tag(WORKER, code, "0.1.0")
    assert first == content_tag(WORKER, code, "0.1.0")  # unchanged: the same image
    assert first.startswith("0.1.0-") and len(first) == len("0.1.0-") + 12
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "sim.cpython-311.pyc").write_bytes(b"cache")
    assert content_tag(WORKER, code, "0.1.0") == first  # caches do not count
    (code / "sim.py").write_text("def run(p):\n    return p + 1\n")
    second = content_tag(WORKER, code, "0.1.0")
    assert second != first  # a changed task is a new image
    (code / "requirements.txt").write_text("numpy\n")
    assert content_tag(WORKER, code, "0.1.0") not in (first, second)
    assert content_tag(WORKER, None, "0.1.0") != first


def test_stage_writes_the_worker_and_the_code(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "sim.py").write_text("x = 1\n")
    out = subprocess.run([sys.executable, "-m", "ttg.cli", "image", "--code", str(code),
                          "--context", str(tmp_path / "ctx")],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    ctx = Path(info["context"])
    assert info["tag"] == content_tag(WORKER, code, "0.1.0")
    assert (ctx / "Dockerfile").is_file() and (ctx / "ttg" / "worker.py").is_file()
    assert (ctx / "code" / "sim.py").read_text() == "x = 1\n"
    assert not (ctx / "tests").exists()
    assert stage(WORKER, code, ctx, "0.1.0") == info["tag"]  # staging again replaces it
