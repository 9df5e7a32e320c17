"""Image slots: the first call of a new trajectory in a slot made from an image (cached on the
worker), beside the same in a default slot, measured in the same run (issue 12: at most 2x).

    .venv/bin/python benchmarks/bench_images.py [--samples 20] [--json]

Everything is started here and stopped at the end (also on Ctrl-C or SIGTERM): an embedded
nats-server, the executor in this process and one sandbox worker as a child process, with no
warm slots (so both kinds of slot start their sandbox at the first call). The image is the
tests' busybox task image (Debian's busybox-static), as an OCI layout; it is pulled once before
the timed calls. New trajectories go one at a time: each one's first call (it gets a slot and
its sandbox starts) and second call (a live slot), then its release; the kinds alternate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import BenchError, Report, machine_info, progress, release_all, run_and_report
from bench_capacity import bench_settings, median_ms, stack

from services._embedded import EmbeddedNatsServer
from services.client import ToolbusClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' image helpers
from tests._images import busybox_image, static_busybox

TARGET_RATIO = 2.0
CALL_TIMEOUT_S = 60.0


async def _call(client: ToolbusClient, tid: str, word: str, image: str | None) -> float:
    started = time.perf_counter()
    result = await client.execute(
        tid, "terminal", {"command": f"echo {word}"}, timeout_s=CALL_TIMEOUT_S, image=image
    )
    elapsed = time.perf_counter() - started
    if not result.success or result.output.strip() != word:
        raise BenchError(f"terminal failed: {result.error or result.output!r}"[:300])
    return elapsed


async def run(data_dir: Path, args: argparse.Namespace) -> Report:
    if not static_busybox():
        raise BenchError("no static /bin/busybox: apt-get install busybox-static")
    layout = busybox_image().write_layout(data_dir / "task-layout", tag="v1")
    image = f"oci:{layout}:v1"
    samples: dict[str, tuple[list[float], list[float]]] = {"default": ([], []), "image": ([], [])}
    async with EmbeddedNatsServer(store_dir=data_dir / "nats", port=0) as server:
        assert server.url is not None
        settings = bench_settings(server.url, data_dir / "stack", slots=4, warm_slots=0)
        async with stack(server.url, settings, 1) as (client, _):
            await _call(client, "pull-once", "pulled", image)  # the image in the cache
            await release_all(client, ["pull-once"])
            progress(f"{args.samples} new trajectories of each kind, one at a time ...")
            for n in range(args.samples):
                for kind in ("default", "image"):
                    tid = f"{kind}-{n}"
                    firsts, seconds = samples[kind]
                    named = image if kind == "image" else None
                    firsts.append(await _call(client, tid, "first", named))
                    seconds.append(await _call(client, tid, "second", None))
                    await release_all(client, [tid])
    rows = {
        kind: {"first_call_ms": median_ms(firsts), "live_call_ms": median_ms(seconds)}
        for kind, (firsts, seconds) in samples.items()
    }
    default_first = rows["default"]["first_call_ms"] or 0.0
    ratio = (rows["image"]["first_call_ms"] or 0.0) / default_first if default_first else None
    return {
        "machine": machine_info(),
        "samples": args.samples,
        "rows": rows,
        "first_call_ratio": None if ratio is None else round(ratio, 2),
        "target_ratio": TARGET_RATIO,
    }


def table(report: Report) -> str:
    lines = [f"{'slot':10} {'first call':>12} {'live call':>12}"]
    for kind, row in report["rows"].items():
        lines.append(f"{kind:10} {row['first_call_ms']:>9.1f} ms {row['live_call_ms']:>9.1f} ms")
    ratio = report["first_call_ratio"]
    ok = "yes" if ratio is not None and ratio <= report["target_ratio"] else "no"
    lines.append(
        f"\nfirst call, image slot / default slot: {ratio}x "
        f"(target <= {report['target_ratio']:g}x): {ok}; medians of {report['samples']} each"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20, help="trajectories per kind [20]")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error("--samples must be at least 1")

    async def bench(data_dir: Path) -> Report:
        return await run(data_dir, args)

    return run_and_report(bench, prefix="toolbus-images-", as_json=args.json, table=table)


if __name__ == "__main__":
    sys.exit(main())
