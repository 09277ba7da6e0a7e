#!/usr/bin/env python3
"""Reads a Parquet file with pyarrow (an implementation independent of the
Rust writer) and prints it as one JSON document:

    {"num_rows": N, "row_groups": [rows, ...],
     "schema": [[name, arrow type], ...], "rows": [{column: value}, ...]}

Timestamps print as RFC 3339 UTC with microseconds ("...T00:00:00.123456Z"),
the form the other export formats use; everything else as JSON does.

    python3 tests/parquet_reader.py FILE

Needs pyarrow (scripts/test.sh installs the pinned version).
"""

import datetime
import json
import sys

try:
    import pyarrow.parquet as pq
except ImportError:
    sys.exit("parquet_reader: pyarrow is missing: run scripts/test.sh, or pip install pyarrow")


def value(v):
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            sys.exit("parquet_reader: a timestamp without a time zone")
        v = v.astimezone(datetime.timezone.utc)
        return v.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return v


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: parquet_reader.py FILE")
    f = pq.ParquetFile(sys.argv[1])
    meta = f.metadata
    table = f.read()
    rows = [{k: value(v) for k, v in row.items()} for row in table.to_pylist()]
    out = {
        "num_rows": meta.num_rows,
        "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
        "schema": [[field.name, str(field.type)] for field in table.schema],
        "rows": rows,
    }
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
