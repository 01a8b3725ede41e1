#!/usr/bin/env python3
"""Benchmark of servekit's model supply chain: mirror throughput, re-run cost of the model module.

    .venv/bin/python benchmarks/model_supply.py [--quick] [--runs N] [--workdir DIR] OUT.json

Prints a table and writes the numbers (min, median and max of every measurement, plus each run)
to OUT.json. Everything is generated (random bytes), served and downloaded on this machine over
loopback, under a fresh temporary directory that is removed at the end.

1. Throughput of one file of 1 GiB (``--quick``: 32 MiB):

   - ``raw_loopback``: the plain loopback copy that bounds everything else: ``curl -s -o /dev/null``
     (or, without curl, a Python reader that discards the bytes) against a minimal server, the
     standard library's ``http.server`` with the body sent by ``socket.sendfile`` (kernel
     ``sendfile``, the data path of nginx with ``sendfile on``);
   - ``mirror_curl``: the same client against servekit's mirror (the server alone);
   - ``mirror_sdk``: the unmodified ModelScope SDK (``snapshot_download``) from the mirror to a
     local directory: it hashes every byte while writing it to disk. Timed inside the process
     around the call (interpreter start and import left out);
   - ``mirror_sdk_4_clients``: four SDK processes at once, each into its own directory; seconds
     from the first start to the last end, MB/s for all four together.

   ``sdk_vs_raw`` is the SDK's throughput divided by the raw copy's (medians).

2. Re-run time of the model module (``ansible/library/servekit_model_sync.py``) over a published,
   unchanged model of 10 MiB, 1 GiB and 4 GiB (``--quick``: 1, 8 and 32 MiB), wall-clock seconds of
   the whole process as Ansible starts it:

   - ``module_quick``: ``verify: quick`` (the manifest's sizes and mtimes; no file is read);
   - ``module_deep``: ``verify: deep`` (every byte re-hashed);
   - ``sdk_rehash``: ``snapshot_download`` over a complete local copy, which is what the SDK does on
     every run (it re-hashes every file before it decides there is nothing to fetch).

   The host's copy is published by the module itself, from a staging directory seeded with hard
   links to the mirror's files (the SDK finds them complete and downloads nothing), so the
   benchmark needs no second copy of the data on disk. The files were just written, so they sit in
   the page cache: the deep numbers are hashing speed, not disk speed (a cold disk is slower).

No page cache is dropped and nothing outside the temporary directory is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import http.server
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from servekit.mirror.process import start_mirror

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "ansible" / "library" / "servekit_model_sync.py"
MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = 16 * MiB
CLIENTS = 4
OWNER = "bench"
MARK = "BENCH-RESULT "

# Runs in a child interpreter: the SDK reads its endpoint from the environment at import.
SDK_CHILD = f"""
import json, sys, time
from modelscope.hub.snapshot_download import snapshot_download
start = time.time()
snapshot_download(sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3], max_workers=4)
end = time.time()
print({MARK!r} + json.dumps({{"start": start, "end": end}}), flush=True)
"""


# --- data ------------------------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, CHUNK)
            f.write(os.urandom(n))
            left -= n


def make_model(root: Path, name: str, shards: list[int]) -> list[str]:
    """``root/OWNER/name`` with a config and ``len(shards)`` random weight files; their paths."""
    model_dir = root / OWNER / name
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"name": name, "shards": len(shards)}))
    files = ["config.json"]
    for i, size in enumerate(shards, 1):
        rel = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_random(model_dir / rel, size)
        files.append(rel)
    return files


# --- servers ---------------------------------------------------------------------------------


class _SendfileHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with the body handed to the kernel (``socket.sendfile``)."""

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        self.wfile.flush()
        self.connection.sendfile(source)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def sendfile_server(directory: Path) -> Iterator[str]:
    handler = functools.partial(_SendfileHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def mirror(root: Path, log: Path) -> Iterator[str]:
    """``python -m servekit.mirror ROOT --port 0``, healthy (start-up hashing done)."""
    started = start_mirror(root, log, timeout=60, ready_timeout=600)
    try:
        yield started.url
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            started.stop()


# --- clients ---------------------------------------------------------------------------------


def raw_get(url: str, size: int) -> float:
    """Seconds to receive ``url`` and throw the bytes away (curl if installed)."""
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if int(out[0]) != size:
            raise RuntimeError(f"{url}: got {out[0]} bytes, expected {size}")
        return float(out[1])
    parsed = urllib.parse.urlsplit(url)
    start = time.perf_counter()
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    conn.request("GET", url[len(f"http://{parsed.netloc}") :])
    resp = conn.getresponse()
    buf = bytearray(MiB)
    got = 0
    while n := resp.readinto(buf):
        got += n
    conn.close()
    if got != size:
        raise RuntimeError(f"{url}: got {got} bytes, expected {size}")
    return time.perf_counter() - start


def client_name() -> str:
    if shutil.which("curl"):
        version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
        return f"{version.split()[0]} {version.split()[1]} -s -o /dev/null"
    return "python http.client, readinto a reused buffer"


def sdk_env(endpoint: str, home: Path) -> dict[str, str]:
    return dict(
        os.environ,
        MODELSCOPE_ENDPOINT=endpoint,
        MODELSCOPE_CACHE=str(home / "cache"),
        MODELSCOPE_HOME=str(home / "home"),
        MODELSCOPE_API_TOKEN="",
        MODELSCOPE_DOWNLOAD_INTRA_CLOUD="false",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )


def sdk_start(endpoint: str, model_id: str, dest: Path, home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SDK_CHILD, model_id, "master", str(dest)],
        env=sdk_env(endpoint, home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sdk_finish(proc: subprocess.Popen) -> tuple[float, float]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"SDK download failed ({proc.returncode}):\n{err[-3000:]}")
    line = [ln for ln in out.splitlines() if ln.startswith(MARK)][-1]
    data = json.loads(line[len(MARK) :])
    return data["start"], data["end"]


def module_run(workdir: Path, endpoint: str, model_id: str, models: Path, verify: str) -> dict:
    args = {
        "model_id": model_id,
        "revision": "v1",
        "endpoint": endpoint,
        "root": str(models),
        "verify": verify,
    }
    args_file = workdir / "module-args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    proc = subprocess.run(
        [sys.executable, str(MODULE), str(args_file)],
        capture_output=True,
        text=True,
        env=sdk_env(endpoint, workdir / "module-home"),
        check=False,
    )
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(f"module printed no result:\n{proc.stderr[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"module failed: {result.get('msg')}")
    return result


# --- measurement -----------------------------------------------------------------------------


def summary(samples: list[float]) -> dict[str, object]:
    return {
        "min": min(samples),
        "median": statistics.median(samples),
        "max": max(samples),
        "runs": samples,
    }


def wall(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_throughput(work: Path, root: Path, url: str, size: int, runs: int) -> dict:
    name = "throughput"
    model_id = f"{OWNER}/{name}"
    weights = "model-00001-of-00001.safetensors"  # what make_model wrote
    raw, mirror_curl, sdk, sdk4, sdk4_clients = [], [], [], [], []
    raw_path = f"{model_id}/{weights}"
    file_url = f"{url}/api/v1/models/{model_id}/repo?Revision=master&FilePath={weights}"
    with sendfile_server(root) as raw_url:
        for run in range(runs):  # alternate the paths so that drift hits all of them alike
            raw.append(raw_get(f"{raw_url}/{raw_path}", size))
            mirror_curl.append(raw_get(file_url, size))

            dest = work / f"sdk-{run}"
            start, end = sdk_finish(sdk_start(url, model_id, dest, work / "sdk-home"))
            sdk.append(end - start)
            shutil.rmtree(dest)

            procs = [
                sdk_start(url, model_id, work / f"sdk4-{run}-{i}", work / f"sdk4-home-{i}")
                for i in range(CLIENTS)
            ]
            times = [sdk_finish(p) for p in procs]
            sdk4.append(max(e for _, e in times) - min(s for s, _ in times))
            sdk4_clients.extend(e - s for s, e in times)
            for i in range(CLIENTS):
                shutil.rmtree(work / f"sdk4-{run}-{i}")

    def row(samples: list[float], nbytes: int) -> dict:
        stats = summary(samples)
        return {"seconds": stats, "mb_per_s": nbytes / 1e6 / stats["median"]}

    out = {
        "file_bytes": size,
        "raw_server": "Python http.server (ThreadingHTTPServer), body sent with socket.sendfile",
        "client": client_name(),
        "raw_loopback": row(raw, size),
        "mirror_curl": row(mirror_curl, size),
        "mirror_sdk": row(sdk, size),
        "mirror_sdk_4_clients": {
            **row(sdk4, CLIENTS * size),
            "clients": CLIENTS,
            "per_client_seconds": summary(sdk4_clients),
        },
    }
    raw_mbps = out["raw_loopback"]["mb_per_s"]
    out["sdk_vs_raw"] = out["mirror_sdk"]["mb_per_s"] / raw_mbps
    out["mirror_vs_raw"] = out["mirror_curl"]["mb_per_s"] / raw_mbps
    out["sdk_4_clients_vs_raw"] = out["mirror_sdk_4_clients"]["mb_per_s"] / raw_mbps
    return out


def bench_rerun(work: Path, url: str, label: str, name: str, files: list[str], runs: int) -> dict:
    model_id = f"{OWNER}/{name}"
    models = work / "models"
    source = work / "mirror" / OWNER / name
    # Seed the staging directory with hard links: the first run publishes without a download.
    staging = models / OWNER / name / ".staging" / "v1"
    staging.mkdir(parents=True)
    for rel in files:
        os.link(source / rel, staging / rel)
    first = module_run(work, url, model_id, models, "quick")
    published = Path(first["path"])
    sdk_dir = work / f"sdk-rehash-{name}"
    sdk_dir.mkdir()
    for rel in files:
        os.link(published / rel, sdk_dir / rel)

    quick, deep, sdk = [], [], []

    def checked(verify: str) -> None:
        result = module_run(work, url, model_id, models, verify)
        if result["changed"]:
            raise RuntimeError(f"a re-run over an unchanged model changed something: {result}")

    for _ in range(runs):
        quick.append(wall(lambda: checked("quick")))
        deep.append(wall(lambda: checked("deep")))
        sdk.append(
            wall(lambda: sdk_finish(sdk_start(url, model_id, sdk_dir, work / "sdk-rehash-home")))
        )
    shutil.rmtree(models / OWNER / name)
    shutil.rmtree(sdk_dir)
    total = sum((source / rel).stat().st_size for rel in files)
    return {
        "label": label,
        "bytes": total,
        "files": len(files),
        "module_quick": summary(quick),
        "module_deep": summary(deep),
        "sdk_rehash": summary(sdk),
    }


# --- report ----------------------------------------------------------------------------------


def table(report: dict) -> str:
    t = report["throughput"]
    lines = [
        f"throughput of one {t['file_bytes'] / MiB:.0f} MiB file over loopback "
        f"(seconds over {report['runs']} runs; client: {t['client']})",
        f"{'path':<22} {'median':>8} {'min':>8} {'max':>8} {'MB/s':>9}",
    ]
    for key in ("raw_loopback", "mirror_curl", "mirror_sdk", "mirror_sdk_4_clients"):
        s = t[key]["seconds"]
        lines.append(
            f"{key:<22} {s['median']:>8.3f} {s['min']:>8.3f} {s['max']:>8.3f} "
            f"{t[key]['mb_per_s']:>9.0f}"
        )
    lines += [
        f"raw_loopback = {t['raw_server']}",
        f"SDK vs raw: {t['sdk_vs_raw']:.2f}   mirror (curl) vs raw: {t['mirror_vs_raw']:.2f}   "
        f"4 SDK clients (aggregate) vs raw: {t['sdk_4_clients_vs_raw']:.2f}",
        "",
        f"re-run over an unchanged published model (wall seconds, median [min-max] "
        f"of {report['runs']})",
        f"{'model':<9} {'files':>5} {'module quick':>20} {'module deep':>20} {'SDK re-hash':>20}",
    ]
    for row in report["rerun"]:
        cells = [
            f"{row[k]['median']:.2f} [{row[k]['min']:.2f}-{row[k]['max']:.2f}]"
            for k in ("module_quick", "module_deep", "sdk_rehash")
        ]
        lines.append(f"{row['label']:<9} {row['files']:>5} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the JSON report")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (a smoke test)")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3, quick 1)")
    parser.add_argument(
        "--workdir", type=Path, help="parent of the temporary directory (default: the system's)"
    )
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    if args.quick:
        throughput_size = 32 * MiB
        rerun_sizes = [("1 MiB", [MiB]), ("8 MiB", [8 * MiB]), ("32 MiB", [16 * MiB, 16 * MiB])]
    else:
        throughput_size = GiB
        rerun_sizes = [("10 MiB", [10 * MiB]), ("1 GiB", [GiB]), ("4 GiB", [GiB] * 4)]

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="servekit-bench-", dir=args.workdir))
    load_before = os.getloadavg()
    try:
        root = work / "mirror"
        print(f"writing test data under {work} ...", file=sys.stderr, flush=True)
        make_model(root, "throughput", [throughput_size])
        rerun_models = []
        for i, (label, shards) in enumerate(rerun_sizes):
            name = f"rerun-{i}"
            rerun_models.append((label, name, make_model(root, name, shards)))
        with mirror(root, work / "mirror.log") as url:
            print("measuring throughput ...", file=sys.stderr, flush=True)
            throughput = bench_throughput(work, root, url, throughput_size, runs)
            rerun = []
            for label, name, files in rerun_models:
                print(f"measuring re-runs over {label} ...", file=sys.stderr, flush=True)
                rerun.append(bench_rerun(work, url, label, name, files, runs))
        report = {
            "quick": args.quick,
            "runs": runs,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                # Other work on the machine skews every number: load averages (1, 5, 15 min).
                "load_before": load_before,
                "load_after": os.getloadavg(),
            },
            "page_cache": "warm: files were just written; no cache was dropped",
            "throughput": throughput,
            "rerun": rerun,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    load_after = report["machine"]["load_after"]
    print(f"1-minute load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}")
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
