"""`dreambooth-server gc [--dry-run] [--json]`: collect the store's garbage (services/gc/collector.py).

The store comes from the same DREAMBOOTH_* settings the services read (S3 when
DREAMBOOTH_S3_ENDPOINT is set, else the local directory store), always at its root: one
collection covers the root and every tenant's prefix (`tenants/{name}/`), and a blob stays while
any tenant's model or pin names it. Safe to run while the services run: unfinished writes are
pinned (services/common/store_pins.py). Prints every object removed (or, with --dry-run, that
would be) with its key as the root sees it and its size, then the totals by kind.
"""

from __future__ import annotations

import argparse
import json
import sys

from services.common.errors import DomainError
from services.common.settings import StoreSettings, from_env
from services.common.store_factory import open_store
from services.common.store_pins import DEFAULT_MAX_COLLECTION_S
from services.gc.collector import CollectionReport, collect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dreambooth-server gc",
        description="Remove what nothing in the store references, over every tenant's prefix: blobs "
        "of deleted models, leftovers of deleted datasets and jobs, checkpoints of finished jobs, "
        "unused prior sets.",
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_COLLECTION_S,
        help=f"stop deleting after this many seconds (default {DEFAULT_MAX_COLLECTION_S:g})",
    )
    args = parser.parse_args(argv)
    store = open_store(from_env(StoreSettings))
    try:
        report = collect(store, dry_run=args.dry_run, max_seconds=args.max_seconds)
    except DomainError as err:
        print(f"gc: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report_json(report)) if args.json else "\n".join(report_lines(report)))
    return 0 if report.complete else 3


def report_lines(report: CollectionReport) -> list[str]:
    verb = "would remove" if report.dry_run else "removed"
    lines = [f"{verb} {item.kind:<18} {item.size:>12,d} B  {item.key}" for item in report.garbage]
    for kind, (count, size) in report.by_kind().items():
        lines.append(f"{kind}: {count} objects, {size:,d} bytes")
    lines.append(f"total: {verb} {len(report.garbage)} objects, {report.bytes:,d} bytes")
    if not report.complete:
        lines.append("stopped at the deadline: run gc again for the rest")
    return lines


def report_json(report: CollectionReport) -> dict[str, object]:
    return {
        "dry_run": report.dry_run,
        "complete": report.complete,
        "objects": len(report.garbage),
        "bytes": report.bytes,
        "by_kind": {kind: {"objects": n, "bytes": b} for kind, (n, b) in report.by_kind().items()},
        "garbage": [{"key": g.key, "size": g.size, "kind": g.kind} for g in report.garbage],
    }


if __name__ == "__main__":
    sys.exit(main())
