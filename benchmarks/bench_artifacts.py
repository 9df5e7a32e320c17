"""Object Store throughput: nats-py's ``ObjectStore`` next to toolbus's ``put_object`` and
``fetch_object`` (services/_objects.py).

    .venv/bin/python benchmarks/bench_artifacts.py [--sizes 1,10,100] [--repeat 3] [--json]

An embedded nats-server (JetStream, file storage) is started here and stopped at the end (also
on Ctrl-C or SIGTERM); all state lives in a temporary directory that is removed at the end. For
each size, a file of random bytes is the source, and each run measures, on one connection:

- put: nats-py ``ObjectStore.put`` (from the open file) and toolbus ``put_object`` (the path);
- get: nats-py ``ObjectStore.get`` (into memory, as it is usually called), nats-py
  ``ObjectStore.get(writeinto=file)``, and toolbus ``fetch_object`` to a path (temporary file,
  renamed at the end), all of the object toolbus stored.

Every result is checked against the source (SHA-256, not timed). The table shows the median
MiB/s over ``--repeat`` runs and the ratios; the target is toolbus fetch >= 5 x nats-py get at
100 MiB. nats-py's in-memory get is slow for large objects (about 4 MiB/s at 100 MiB), so the
default run takes about two and a half minutes, most of it in that column.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import nats
from _common import (
    BenchError,
    Report,
    machine_info,
    positive_ints,
    progress,
    run_and_report,
)
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from services._embedded import EmbeddedNatsServer
from services._objects import DEFAULT_CHUNK_SIZE, fetch_object, open_object_store, put_object

MiB = 1024 * 1024
BUCKET = "bench-artifacts"
TARGET_SIZE_MIB = 100
TARGET_RATIO = 5.0
OPERATION_TIMEOUT_S = 600.0

# (key, two header lines): the columns of the put and the get table.
PUT_COLUMNS = [("nats_py_put", ("nats-py", "put")), ("toolbus_put", ("toolbus", "put_object"))]
GET_COLUMNS = [
    ("nats_py_get", ("nats-py", "get")),
    ("nats_py_get_writeinto", ("nats-py get", "(writeinto)")),
    ("toolbus_fetch", ("toolbus", "fetch_object")),
]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


async def _timed(operation: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await asyncio.wait_for(operation(), OPERATION_TIMEOUT_S)
    return time.perf_counter() - started


async def one_run(
    js: JetStreamContext, store: ObjectStore, size_mib: int, source: Path, sha256: str, tmp: Path
) -> dict[str, float]:
    """Seconds per operation for one run of one size."""
    name = f"object-{size_mib}"
    seconds: dict[str, float] = {}

    async def nats_py_put() -> None:
        with source.open("rb") as file:
            await store.put(f"nats-py-{name}", file)

    seconds["nats_py_put"] = await _timed(nats_py_put)
    await store.delete(f"nats-py-{name}")  # keeps the bucket small; not timed

    async def toolbus_put() -> None:
        stored = await put_object(js, BUCKET, name, source, timeout_s=OPERATION_TIMEOUT_S)
        if stored.sha256 != sha256:
            raise BenchError(f"put_object stored {stored.sha256}, the source is {sha256}")

    seconds["toolbus_put"] = await _timed(toolbus_put)

    got: list[bytes] = []

    async def nats_py_get() -> None:
        got.append((await store.get(name)).data or b"")

    seconds["nats_py_get"] = await _timed(nats_py_get)
    if hashlib.sha256(got.pop()).hexdigest() != sha256:
        raise BenchError(f"nats-py get of {size_mib} MiB returned other bytes")

    written = tmp / "nats-py-get.bin"

    async def nats_py_get_writeinto() -> None:
        with written.open("wb") as file:
            await store.get(name, writeinto=file)

    seconds["nats_py_get_writeinto"] = await _timed(nats_py_get_writeinto)
    if _sha256_file(written) != sha256:
        raise BenchError(f"nats-py get(writeinto) of {size_mib} MiB wrote other bytes")
    written.unlink()

    fetched = tmp / "toolbus-fetch.bin"

    async def toolbus_fetch() -> None:
        await fetch_object(js, BUCKET, name, fetched, timeout_s=OPERATION_TIMEOUT_S)

    seconds["toolbus_fetch"] = await _timed(toolbus_fetch)
    if _sha256_file(fetched) != sha256:
        raise BenchError(f"fetch_object of {size_mib} MiB wrote other bytes")
    fetched.unlink()
    return seconds


async def run(args: argparse.Namespace, data_dir: Path) -> Report:
    results: list[dict[str, object]] = []
    async with EmbeddedNatsServer(store_dir=data_dir / "nats", port=0) as server:
        nc = await nats.connect(server.url, name="bench-artifacts")
        try:
            js = nc.jetstream()
            store = await open_object_store(js, BUCKET, description="toolbus benchmark")
            server_version = str(nc._server_info.get("version", "?"))
            for size_mib in sorted(set(args.sizes)):
                source = data_dir / f"source-{size_mib}.bin"
                with source.open("wb") as file:
                    for _ in range(size_mib):
                        file.write(os.urandom(MiB))
                sha256 = _sha256_file(source)
                runs: dict[str, list[float]] = {}
                for index in range(args.repeat):
                    progress(f"{size_mib} MiB, run {index + 1} of {args.repeat} ...")
                    seconds = await one_run(js, store, size_mib, source, sha256, data_dir)
                    for key, value in seconds.items():
                        runs.setdefault(key, []).append(size_mib / value)
                    progress(
                        "  "
                        + ", ".join(
                            f"{key} {size_mib / s:,.1f} MiB/s" for key, s in seconds.items()
                        )
                    )
                source.unlink()
                results.append(
                    {
                        "size_mib": size_mib,
                        "mib_per_s": {k: round(statistics.median(v), 1) for k, v in runs.items()},
                        "runs_mib_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                    }
                )
            await js.delete_object_store(BUCKET)
        finally:
            await nc.close()
    target = next((r for r in results if r["size_mib"] == TARGET_SIZE_MIB), None)
    ratio = None
    if target is not None:
        speeds = target["mib_per_s"]
        assert isinstance(speeds, dict)
        ratio = round(speeds["toolbus_fetch"] / speeds["nats_py_get"], 1)
    return {
        "machine": {**machine_info(), "nats_server": server_version},
        "config": {
            "sizes_mib": args.sizes,
            "repeat": args.repeat,
            "chunk_size": DEFAULT_CHUNK_SIZE,
            "storage": "file",
        },
        "results": results,
        "target": {
            "size_mib": TARGET_SIZE_MIB,
            "fetch_over_get": ratio,
            "required": TARGET_RATIO,
            "met": None if ratio is None else ratio >= TARGET_RATIO,
        },
    }


def _speed(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _rows(
    results: Sequence[dict[str, Any]],
    title: str,
    columns: Sequence[tuple[str, tuple[str, str]]],
    ratios: Sequence[tuple[tuple[str, str], str, str]],
) -> list[str]:
    """A table: size, the MiB/s columns, then ratios (header lines, numerator, denominator)."""
    headers = [header for _, header in columns] + [header for header, _, _ in ratios]
    width = max(len(line) for header in headers for line in header) + 2
    lines = [
        f"{title:<10}" + "".join(f"{top:>{width}}" for top, _ in headers),
        f"{'':<10}" + "".join(f"{bottom:>{width}}" for _, bottom in headers),
    ]
    for result in results:
        speeds = result["mib_per_s"]
        cells = [_speed(speeds[key]) for key, _ in columns]
        cells += [f"{speeds[top] / speeds[bottom]:.1f}x" for _, top, bottom in ratios]
        size = f"{result['size_mib']} MiB"
        lines.append(f"{size:>10}" + "".join(f"{cell:>{width}}" for cell in cells))
    return lines


def table(report: Report) -> str:
    machine, config = report["machine"], report["config"]
    lines = [
        f"toolbus Object Store benchmark: median MiB/s of {config['repeat']} runs; "
        f"{machine['cpus']} CPUs, Python {machine['python']},",
        f"nats-server {machine['nats_server']} on localhost ({config['storage']} storage), "
        f"{config['chunk_size'] // 1024} KiB chunks",
        "",
    ]
    results = report["results"]
    lines += _rows(
        results, "put", PUT_COLUMNS, [(("toolbus/", "nats-py"), "toolbus_put", "nats_py_put")]
    )
    lines.append("")
    lines += _rows(
        results,
        "get",
        GET_COLUMNS,
        [
            (("fetch/", "get"), "toolbus_fetch", "nats_py_get"),
            (("fetch/", "writeinto"), "toolbus_fetch", "nats_py_get_writeinto"),
        ],
    )
    target = report["target"]
    lines.append("")
    if target["fetch_over_get"] is None:
        lines.append(
            f"toolbus fetch / nats-py get at {target['size_mib']} MiB: not measured "
            f"(target >= {target['required']:g})"
        )
    else:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(
            f"toolbus fetch / nats-py get at {target['size_mib']} MiB = "
            f"{target['fetch_over_get']:g} (target >= {target['required']:g}): {verdict}"
        )
    return "\n".join(line.rstrip() for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Object Store MiB/s: nats-py put/get next to toolbus put_object/fetch_object."
    )
    parser.add_argument(
        "--sizes",
        type=positive_ints("1,10,100"),
        default=[1, 10, 100],
        help="object sizes in MiB [default: 1,10,100]",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per size; the median counts [default: 3]"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat < 1:
        print("bench: --repeat must be >= 1", file=sys.stderr)
        return 2
    return run_and_report(
        lambda data_dir: run(args, data_dir),
        prefix="toolbus-bench-",
        as_json=args.json,
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
