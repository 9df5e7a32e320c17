"""``toolbus status`` as text: a pure function of the StatusReply, so it is testable and the
one-shot and ``--watch`` views are the same."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.messages import StatusReply

_WORKER_COLUMNS = ("WORKER", "HOST", "SLOTS", "FREE", "WARM", "IN USE", "STATE", "LAST SEEN")
_LEFT_ALIGNED = {"WORKER", "HOST", "STATE"}


def render_status(status: StatusReply) -> str:
    """The status as lines of text (no trailing newline): executor and rates, pool, workers."""
    pool = status.pool
    rates = status.rates
    states = ", ".join(f"{state} {count}" for state, count in sorted(pool.slots_by_state.items()))
    if pool.warm_slots:  # of the free ones: their sandbox is started
        states += f"; {pool.warm_slots} of the free warm"
    lines = [
        f"executor {status.executor_id} | queue {status.queue_size} | "
        f"{status.total_requests} requests, {status.total_errors} errors | "
        f"calls/s {_rate(rates.calls_per_s_10s)} (10 s) {_rate(rates.calls_per_s_60s)} (60 s) | "
        f"errors/s {_rate(rates.errors_per_s_60s)} (60 s)",
        f"pool: {pool.containers} workers, {pool.total_slots} slots"
        + (f" ({states})" if states else ""),
    ]
    if not status.workers:
        lines.append("no workers registered")
        return "\n".join(lines)
    rows = [
        (
            worker.worker_id,
            worker.host,
            str(worker.slots_total),
            str(worker.slots_free),
            str(worker.slots_warm),
            str(
                worker.slots_held
                if worker.slots_held is not None
                else worker.slots_total - worker.slots_free
            ),
            worker.state,
            f"{worker.age_s:.1f}s ago",
        )
        for worker in sorted(status.workers, key=lambda worker: worker.worker_id)
    ]
    lines.extend(_table(_WORKER_COLUMNS, rows))
    return "\n".join(lines)


def _rate(per_second: float) -> str:
    """Two significant decimals where they matter (0.05 errors/s), none where they do not."""
    if per_second >= 100:
        return f"{per_second:.0f}"
    if per_second >= 10:
        return f"{per_second:.1f}"
    return f"{per_second:.2f}"


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns as wide as their widest cell: worker ids and host names vary a lot."""
    widths = [max(len(cell) for cell in column) for column in zip(columns, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if name in _LEFT_ALIGNED else cell.rjust(width)
            for name, cell, width in zip(columns, cells, widths, strict=True)
        ).rstrip()

    return [line(columns), *(line(row) for row in rows)]
