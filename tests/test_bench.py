"""The bench harness in its smallest mode against a real server (no speed is asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

TARGET_FIELDS = {
    "MiB_per_s", "min_MiB_per_s", "max_MiB_per_s", "runs", "seconds", "bytes_sent",
    "bytes_counted", "requests", "latency_p50_ms", "latency_p99_ms", "completion_p50_ms",
    "peak_rss_mib", "cpu_s_per_gib", "uploads", "uploads_completed_right_size",
    "bytes_sent_total", "bytes_counted_total", "uploads_total",
    "uploads_completed_right_size_total", "cpu_ms_per_request", "requests_per_s",
    "dirtied_per_byte",
}  # fmt: skip


def test_smallest_run_counts_every_byte_and_completes_every_upload(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smallest",
            "--out",
            str(tmp_path),
            "--name",
            "t",
            "--data-root",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "t.json").read_text())
    assert {"schema", "started", "command", "unit", "machine", "options", "limits", "targets",
            "cells"} <= set(result)  # fmt: skip
    assert {"cores", "cpu", "memory_gib", "filesystem", "kernel"} <= set(result["machine"])
    assert result["limits"]["disk_MiB_per_s"]["1"] > 0
    assert {c["shape"] for c in result["cells"]} == {"files", "parallel"}
    for cell in result["cells"]:
        assert {"fraction_of_disk", "fraction_of_nginx", "cpu_vs_nginx"} <= set(cell)
        if "nginx" in cell["targets"]:  # both references: bodies' files cleaned, and kept
            assert cell["targets"]["nginx-keep"]["uploads_total"] >= 1
            assert cell["fraction_of_nginx_keep"] is not None
        ours = cell["targets"]["chunkserver"]
        assert set(ours) >= TARGET_FIELDS
        assert ours["bytes_sent_total"] == 16 * 2**20
        assert ours["bytes_counted_total"] == ours["bytes_sent_total"]
        assert ours["uploads_total"] >= 1
        assert ours["uploads_completed_right_size_total"] == ours["uploads_total"]
        assert ours["peak_rss_mib"] > 0 and ours["cpu_s_per_gib"] > 0
        assert ours["completion_p50_ms"] is not None
        assert ours["dirtied_per_byte"] is not None
        if "nginx" in cell["targets"]:  # chunkserver behind deploy/nginx.conf, too
            behind = cell["targets"]["chunkserver-nginx"]
            assert behind["bytes_sent_total"] == ours["bytes_sent_total"]
            assert behind["uploads_completed_right_size_total"] == behind["uploads_total"] >= 1
            assert behind["cpu_s_per_gib"] > 0 and cell["behind_nginx_vs_alone"] is not None
        if "fastapi" in cell["targets"]:  # the seed's endpoint, when FastAPI is installed
            assert cell["targets"]["fastapi"]["uploads_total"] >= 1
            assert cell["fraction_of_fastapi"] is not None
    assert "| shape | chunk | conc |" in (tmp_path / "t.md").read_text()
    assert "Behind deploy/nginx.conf" in (tmp_path / "t.md").read_text()
    assert "| files | 1 MiB | 2 |" in done.stdout
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert not list(tmp_path.glob("bench-warm-*"))  # the pages' warm-up file is dropped


@pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="no nginx binary (apt-get install nginx); .ci/run installs it",
)
def test_downloads_compare_chunkserver_with_nginx_sending_its_files(tmp_path: Path) -> None:
    """bench/downloads.py: the same files from chunkserver itself and through deploy/nginx.conf
    (X-Accel-Redirect), every byte checked (no speed asserted)."""
    out = tmp_path / "d.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.downloads", "--size-mib", "1", "--files", "2",
         "--repeats", "1", "--data-root", str(tmp_path), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())["targets"]
    assert set(figures) == {"chunkserver", "chunkserver-nginx"}
    assert all(f["MiB_per_s"] > 0 and f["cpu_s_per_GiB"] >= 0 for f in figures.values())


def test_floor_times_each_step_the_protocol_requires(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/floor.py", "--size", "4MiB", "--chunk-sizes", "1",
         "--repeats", "1", "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 1 MiB |"))
    write, copy, hashing, unlink, total = (float(cell) for cell in row.split("|")[2:7])
    assert min(write, copy, hashing, unlink) >= 0
    assert total == pytest.approx(copy + hashing, abs=0.011)
    assert list(tmp_path.iterdir()) == []  # its files are gone


def test_the_s3_matrix_runs_beside_a_plain_s3_client(tmp_path: Path) -> None:
    """`--storage s3`: chunkserver on a real Swift and PostgreSQL, and the plain client."""
    from . import realstack

    for reason in (realstack.why_missing_swift(), realstack.why_missing_postgres()):
        if reason is not None:
            pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--storage", "s3", "--smallest", "--shapes", "files",
         "--out", str(tmp_path), "--name", "s3", "--data-root", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "s3.json").read_text())
    # @tus/server with @tus/s3-store too, where Node.js and tests/js's packages are
    assert result["targets"][:2] == ["chunkserver", "s3-direct"]
    assert set(result["targets"][2:]) <= {"tus-s3-store"}
    assert result["options"]["storage"] == "s3"
    for cell in result["cells"]:
        assert cell["fraction_of_s3_direct"] > 0
        ours, direct = cell["targets"]["chunkserver"], cell["targets"]["s3-direct"]
        assert ours["bytes_counted_total"] == ours["bytes_sent_total"] == 16 * 2**20
        assert ours["uploads_completed_right_size_total"] == ours["uploads_total"] >= 1
        assert direct["bytes_sent_total"] == 16 * 2**20
        assert ours["store_cpu_s_per_gib"] > 0 and direct["store_cpu_s_per_gib"] > 0
        tus = cell["targets"].get("tus-s3-store")
        if tus is not None:  # files only: tus has no parallel chunks
            assert cell["shape"] == "files"
            assert tus["bytes_sent_total"] == 16 * 2**20
            assert tus["uploads_completed_right_size_total"] == tus["uploads_total"] >= 1
    assert "x s3-direct" in (tmp_path / "s3.md").read_text()


@pytest.mark.skipif(
    not (ROOT / "tests" / "js" / "node_modules" / "@tus" / "server").is_dir(),
    reason="needs `npm ci` in tests/js (.ci/run does it) for @tus/server",
)
def test_tus_protocol_run_sends_the_same_bytes_to_every_stream_target(tmp_path: Path) -> None:
    """--protocol tus: chunkserver's seed, tus and IETF draft loads, and @tus/server."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smallest", "--protocol", "tus", "--no-sink",
         "--out", str(tmp_path), "--name", "t", "--data-root", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["targets"] == [
        "chunkserver", "chunkserver-tus", "chunkserver-resumable", "tus-server"]  # fmt: skip
    for cell in result["cells"]:
        assert cell["shape"] == "files" and cell["tus_vs_tus_server"] > 0
        for name in result["targets"]:
            figures = cell["targets"][name]
            assert figures["bytes_sent_total"] == 16 * 2**20
            assert figures["uploads_completed_right_size_total"] == figures["uploads_total"]
    report = (tmp_path / "t.md").read_text()
    assert "@tus/server" in report and "resumable" in report
