"""The bench's outputs: fractions of the limits, the markdown table, and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def add_fractions(result: dict[str, Any]) -> None:
    """Each cell's chunkserver throughput as a fraction of the disk limit and of nginx."""
    disk = result["limits"]["disk_MiB_per_s"]
    for cell in result["cells"]:
        ours = cell["targets"].get("chunkserver", {}).get("MiB_per_s")
        nginx = cell["targets"].get("nginx", {}).get("MiB_per_s")
        limit = disk.get(str(cell["chunk_mib"]))
        cell["fraction_of_disk"] = ours / limit if ours and limit else None
        cell["fraction_of_nginx"] = ours / nginx if ours and nginx else None
        ours_cpu = cell["targets"].get("chunkserver", {}).get("cpu_s_per_gib")
        nginx_cpu = cell["targets"].get("nginx", {}).get("cpu_s_per_gib")
        cell["cpu_vs_nginx"] = ours_cpu / nginx_cpu if ours_cpu and nginx_cpu else None
        behind = cell["targets"].get("chunkserver-nginx", {})
        behind_speed, behind_cpu = behind.get("MiB_per_s"), behind.get("cpu_s_per_gib")
        cell["behind_nginx_vs_alone"] = behind_speed / ours if behind_speed and ours else None
        cell["behind_nginx_cpu_vs_alone"] = (
            behind_cpu / ours_cpu if behind_cpu and ours_cpu else None
        )
        jwt_speed = cell["targets"].get("chunkserver-jwt", {}).get("MiB_per_s")
        cell["jwt_vs_off"] = jwt_speed / ours if jwt_speed and ours else None
        keeping = cell["targets"].get("nginx-keep", {}).get("MiB_per_s")
        cell["fraction_of_nginx_keep"] = ours / keeping if ours and keeping else None
        # Against the faster of the seed's FastAPI code as `def` and as `async def`.
        fastapi = max(
            (cell["targets"].get(name, {}).get("MiB_per_s") or 0)
            for name in ("fastapi", "fastapi-async")
        )
        cell["fraction_of_fastapi"] = ours / fastapi if ours and fastapi else None
        direct = cell["targets"].get("s3-direct", {}).get("MiB_per_s")
        cell["fraction_of_s3_direct"] = ours / direct if ours and direct else None
        tus_s3 = cell["targets"].get("tus-s3-store", {}).get("MiB_per_s")
        cell["vs_tus_s3_store"] = ours / tus_s3 if ours and tus_s3 else None
        ours_tus = cell["targets"].get("chunkserver-tus", {}).get("MiB_per_s")
        peer_tus = cell["targets"].get("tus-server", {}).get("MiB_per_s")
        cell["tus_vs_tus_server"] = ours_tus / peer_tus if ours_tus and peer_tus else None


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    if result["options"].get("protocol") == "tus":
        return _tus_markdown(result)
    if result["options"].get("storage") == "s3":
        return _s3_markdown(result)
    machine = result["machine"]
    lines = [
        f"# Bench run {result['started']}",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"{machine['filesystem']} filesystem, kernel {machine['kernel']}, Python "
        f"{machine['python']}, aiohttp {machine['aiohttp']}. Client and server share the cores.",
        "",
        f"Throughput in {result['unit']}; median of {result['options']['repeats']} runs of "
        f"{result['options']['volume_mib']} MiB per cell, min-max in brackets.",
        "",
        "Disk limit (the same bytes written as chunk-sized files"
        + (", fdatasync each" if result["limits"]["disk_fsync"] else ", page cache")
        + "): "
        + ", ".join(
            f"{k} MiB: {v:.0f} MiB/s" for k, v in result["limits"]["disk_MiB_per_s"].items()
        ),
        "",
        "| shape | chunk | conc | chunkserver MiB/s | x disk | x nginx | x nginx-keep "
        "| x FastAPI | nginx MiB/s (clean / keep) "
        "| FastAPI MiB/s (def / async) | sink MiB/s | req/s (nginx, FastAPI) | p50 ms | p99 ms "
        "| completion ms | peak RSS MiB | CPU s/GiB (nginx, FastAPI) | CPU ms/req "
        "| dirtied/byte |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- | --- | --- | --- | --- |",
    ]
    for cell in result["cells"]:
        ours = cell["targets"].get("chunkserver", {})
        nginx = cell["targets"].get("nginx", {})
        nginx_keep = cell["targets"].get("nginx-keep", {})
        sink = cell["targets"].get("sink", {})
        speed = (
            f"{ours['MiB_per_s']:.0f} ({ours['min_MiB_per_s']:.0f}-{ours['max_MiB_per_s']:.0f})"
            if ours
            else "-"
        )
        fastapi = cell["targets"].get("fastapi", {})
        fastapi_async = cell["targets"].get("fastapi-async", {})
        chunk = cell["chunk_mib"]
        chunk_text = f"{chunk} MiB" if chunk >= 1 else f"{round(chunk * 1024)} KiB"
        lines.append(
            f"| {cell['shape']} | {chunk_text} | {cell['concurrency']} | {speed} "
            f"| {_num(cell['fraction_of_disk'], 2)} | {_num(cell['fraction_of_nginx'], 2)} "
            f"| {_num(cell.get('fraction_of_nginx_keep'), 2)} "
            f"| {_num(cell.get('fraction_of_fastapi'), 2)} "
            f"| {_num(nginx.get('MiB_per_s'))} / {_num(nginx_keep.get('MiB_per_s'))} "
            f"| {_num(fastapi.get('MiB_per_s'))} / "
            f"{_num(fastapi_async.get('MiB_per_s'))} "
            f"| {_num(sink.get('MiB_per_s'))} "
            f"| {_num(ours.get('requests_per_s'))} ({_num(nginx.get('requests_per_s'))}, "
            f"{_num(fastapi.get('requests_per_s'))}) "
            f"| {_num(ours.get('latency_p50_ms'), 1)} | {_num(ours.get('latency_p99_ms'), 1)} "
            f"| {_num(ours.get('completion_p50_ms'), 1)} | {_num(ours.get('peak_rss_mib'), 1)} "
            f"| {_num(ours.get('cpu_s_per_gib'), 2)} ({_num(nginx.get('cpu_s_per_gib'), 2)}, "
            f"{_num(fastapi.get('cpu_s_per_gib'), 2)}) "
            f"| {_num(ours.get('cpu_ms_per_request'), 2)} "
            f"| {_num(ours.get('dirtied_per_byte'), 2)} |"
        )
    if any("chunkserver-nginx" in cell["targets"] for cell in result["cells"]):
        lines += [
            "",
            "Behind deploy/nginx.conf (chunkserver-nginx: its upstream one unix socket; CPU of",
            "nginx and chunkserver together), in the same run:",
            "",
            "| shape | chunk | conc | alone MiB/s | behind nginx MiB/s | x alone "
            "| CPU s/GiB alone, behind | CPU x alone |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for cell in result["cells"]:
            alone = cell["targets"].get("chunkserver", {})
            behind = cell["targets"].get("chunkserver-nginx", {})
            lines.append(
                f"| {cell['shape']} | {cell['chunk_mib']} MiB | {cell['concurrency']} "
                f"| {_num(alone.get('MiB_per_s'))} | {_num(behind.get('MiB_per_s'))} "
                f"| {_num(cell.get('behind_nginx_vs_alone'), 2)} "
                f"| {_num(alone.get('cpu_s_per_gib'), 2)}, {_num(behind.get('cpu_s_per_gib'), 2)} "
                f"| {_num(cell.get('behind_nginx_cpu_vs_alone'), 2)} |"
            )
    if any("chunkserver-jwt" in cell["targets"] for cell in result["cells"]):
        lines += [
            "",
            "With authentication on (a JWT verified on every request), in the same run:",
            "",
            "| shape | chunk | conc | off MiB/s | JWT MiB/s | JWT x off | CPU s/GiB off, JWT "
            "| CPU ms/req off, JWT |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for cell in result["cells"]:
            off = cell["targets"].get("chunkserver", {})
            on = cell["targets"].get("chunkserver-jwt", {})
            lines.append(
                f"| {cell['shape']} | {cell['chunk_mib']} MiB | {cell['concurrency']} "
                f"| {_num(off.get('MiB_per_s'))} | {_num(on.get('MiB_per_s'))} "
                f"| {_num(cell.get('jwt_vs_off'), 2)} "
                f"| {_num(off.get('cpu_s_per_gib'), 2)}, {_num(on.get('cpu_s_per_gib'), 2)} "
                f"| {_num(off.get('cpu_ms_per_request'), 2)}, "
                f"{_num(on.get('cpu_ms_per_request'), 2)} |"
            )
    lines += [
        "",
        "completion ms: from the last byte of an upload's last chunk sent to its completed "
        "answer, median over uploads. CPU s/GiB, CPU ms/req, peak RSS and dirtied/byte (page "
        "cache dirtied, /proc/PID/io write_bytes, per byte uploaded): the server's processes, "
        "from /proc (left out with --url). FastAPI: the seed's endpoint on uvicorn "
        "(bench/fastapi_seed.py), as `def` and as `async def`; x FastAPI is against the "
        "faster of the two. nginx: the DAV module's PUT with client_body_in_file_only clean "
        "(the reference of every earlier run); nginx-keep: the same with `on`, its bodies' "
        "files kept. Before every run of every target a file of the run's volume is written "
        "and dropped on the data filesystem (untimed): see bench/README.md.",
        "",
    ]
    return "\n".join(lines)


def _s3_markdown(result: dict[str, Any]) -> str:
    """`--storage s3`: chunkserver on the object store beside a plain S3 client."""
    machine = result["machine"]
    lines = [
        f"# Bench run {result['started']} (storage = s3)",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"kernel {machine['kernel']}, Python {machine['python']}. The client, chunkserver, a "
        "one-node OpenStack Swift (s3api) and PostgreSQL share the cores.",
        "",
        f"Throughput in {result['unit']}; median of {result['options']['repeats']} runs of "
        f"{result['options']['volume_mib']} MiB per cell, min-max in brackets. s3-direct: the "
        "same bytes sent straight to Swift by a plain S3 client (multipart upload, parts of "
        "the chunk size but at least 5 MiB, the same concurrency; bench/s3peer.py). "
        "@tus/s3-store: @tus/server with its S3Store (parts of 5 MiB) on the same Swift, sent "
        "the same bytes as tus PATCHes of the chunk size (bench/tus_s3_server.js; files only).",
        "",
        "| shape | chunk | conc | chunkserver MiB/s | s3-direct MiB/s | x s3-direct "
        "| @tus/s3-store MiB/s | x @tus/s3-store "
        "| completion ms (direct) | peak RSS MiB | chunkserver CPU s/GiB "
        "| store CPU s/GiB (direct) | CPU ms/req |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in result["cells"]:
        ours = cell["targets"].get("chunkserver", {})
        direct = cell["targets"].get("s3-direct", {})
        speed = (
            f"{ours['MiB_per_s']:.0f} ({ours['min_MiB_per_s']:.0f}-{ours['max_MiB_per_s']:.0f})"
            if ours
            else "-"
        )
        direct_speed = (
            f"{direct['MiB_per_s']:.0f} ({direct['min_MiB_per_s']:.0f}-"
            f"{direct['max_MiB_per_s']:.0f})"
            if direct
            else "-"
        )
        chunk = cell["chunk_mib"]
        chunk_text = f"{chunk} MiB" if chunk >= 1 else f"{round(chunk * 1024)} KiB"
        lines.append(
            f"| {cell['shape']} | {chunk_text} | {cell['concurrency']} | {speed} "
            f"| {direct_speed} | {_num(cell.get('fraction_of_s3_direct'), 2)} "
            f"| {_speed(cell['targets'].get('tus-s3-store', {}))} "
            f"| {_num(cell.get('vs_tus_s3_store'), 2)} "
            f"| {_num(ours.get('completion_p50_ms'))} ({_num(direct.get('completion_p50_ms'))}) "
            f"| {_num(ours.get('peak_rss_mib'), 1)} | {_num(ours.get('cpu_s_per_gib'), 2)} "
            f"| {_num(ours.get('store_cpu_s_per_gib'), 2)} "
            f"({_num(direct.get('store_cpu_s_per_gib'), 2)}) "
            f"| {_num(ours.get('cpu_ms_per_request'), 2)} |"
        )
    lines += [
        "",
        "completion ms: from the last byte of an upload's last chunk sent to its completed "
        "answer (direct: the CompleteMultipartUpload call), median over uploads. chunkserver "
        "CPU and peak RSS: its process, from /proc. store CPU: Swift's servers, memcached and "
        "PostgreSQL, from /proc, per GiB uploaded, for each target's runs.",
        "",
    ]
    return "\n".join(lines)


def _speed(figures: dict[str, Any]) -> str:
    if not figures:
        return "-"
    return (
        f"{figures['MiB_per_s']:.0f} ({figures['min_MiB_per_s']:.0f}-"
        f"{figures['max_MiB_per_s']:.0f})"
    )


def _tus_markdown(result: dict[str, Any]) -> str:
    """`--protocol tus`: chunkserver's seed and tus loads beside @tus/server."""
    machine = result["machine"]
    options = result["options"]
    lines = [
        f"# Bench run {result['started']} (tus)",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"{machine['filesystem']} filesystem, kernel {machine['kernel']}, Python "
        f"{machine['python']}. Client and servers share the cores.",
        "",
        f"Throughput in {result['unit']}; median of {options['repeats']} runs of "
        f"{options['volume_mib']} MiB per cell (files of 64 MiB, `conc` at once), min-max in "
        "brackets. seed: chunkserver's POST /upload-chunk; tus: chunkserver's /tus/ (POST, then "
        "PATCHes of the chunk size); resumable: chunkserver's /resumable/ (the IETF draft: "
        "POST, then PATCHes, the last with Upload-Complete: ?1); @tus/server: the npm package "
        "with its FileStore on Node "
        "(bench/tus_server.js), sent the same tus requests (bench/tusload.py).",
        "",
        "| chunk | conc | seed MiB/s | tus MiB/s | resumable MiB/s | @tus/server MiB/s "
        "| tus x @tus/server | resumable x tus "
        "| CPU s/GiB seed, tus, resumable, @tus/server | peak RSS MiB seed/tus/resumable, "
        "@tus/server | PATCH p50 ms tus, resumable, @tus/server |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in result["cells"]:
        seed = cell["targets"].get("chunkserver", {})
        tus = cell["targets"].get("chunkserver-tus", {})
        ietf = cell["targets"].get("chunkserver-resumable", {})
        peer = cell["targets"].get("tus-server", {})
        chunk = cell["chunk_mib"]
        chunk_text = f"{chunk} MiB" if chunk >= 1 else f"{round(chunk * 1024)} KiB"
        ratio = None
        if ietf.get("MiB_per_s") and tus.get("MiB_per_s"):
            ratio = ietf["MiB_per_s"] / tus["MiB_per_s"]
        rss = max(seed.get("peak_rss_mib") or 0, tus.get("peak_rss_mib") or 0)
        rss = max(rss, ietf.get("peak_rss_mib") or 0)
        lines.append(
            f"| {chunk_text} | {cell['concurrency']} | {_speed(seed)} | {_speed(tus)} "
            f"| {_speed(ietf)} | {_speed(peer)} | {_num(cell.get('tus_vs_tus_server'), 2)} "
            f"| {_num(ratio, 2)} "
            f"| {_num(seed.get('cpu_s_per_gib'), 2)}, {_num(tus.get('cpu_s_per_gib'), 2)}, "
            f"{_num(ietf.get('cpu_s_per_gib'), 2)}, {_num(peer.get('cpu_s_per_gib'), 2)} "
            f"| {_num(rss, 1)}, {_num(peer.get('peak_rss_mib'), 1)} "
            f"| {_num(tus.get('latency_p50_ms'), 1)}, {_num(ietf.get('latency_p50_ms'), 1)}, "
            f"{_num(peer.get('latency_p50_ms'), 1)} |"
        )
    lines += [
        "",
        "CPU and peak RSS: each server's processes, from /proc, over its own runs; chunkserver "
        "serves both loads from one process.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Throughput against chunk size, a line per concurrency, limits as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = result["options"]["shapes"]
    figure, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    disk = result["limits"]["disk_MiB_per_s"]
    disk_median = sorted(disk.values())[len(disk) // 2] if disk else None
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for axis, shape in zip(axes[0], shapes, strict=True):
        cells = [c for c in result["cells"] if c["shape"] == shape]
        for color, concurrency in zip(colors, result["options"]["concurrency"], strict=False):
            row = sorted(
                (c for c in cells if c["concurrency"] == concurrency), key=lambda c: c["chunk_mib"]
            )
            sizes = [c["chunk_mib"] for c in row]
            ours = [c["targets"].get("chunkserver", {}).get("MiB_per_s") for c in row]
            axis.plot(sizes, ours, "o-", color=color, label=f"chunkserver, {concurrency} at once")
            nginx = [c["targets"].get("nginx", {}).get("MiB_per_s") for c in row]
            if all(v is not None for v in nginx):
                median = sorted(nginx)[len(nginx) // 2]
                axis.axhline(
                    median, color=color, linestyle=":", label=f"nginx limit, {concurrency} at once"
                )
        if disk_median:
            axis.axhline(disk_median, color="black", linestyle="--", label="disk limit")
        axis.set_title(
            f"{shape}: "
            + ("files sent chunk by chunk" if shape == "files" else "one file, chunks in parallel")
        )
        axis.set_xlabel("chunk size (MiB)")
        axis.set_ylabel("MiB/s until completed")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"chunkserver bench, {result['started']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
