"""Starts bqemulator (the BigQuery REST API on DuckDB) for the local stack.

Two of its behaviours are adjusted here, both to match BigQuery rather than to help Pulse:

- It refuses to start without DuckDB's `spatial` extension (GEOGRAPHY), which it downloads
  from extensions.duckdb.org. That host is unreachable on offline machines and Pulse has no
  GEOGRAPHY column, so the extension is not loaded.
- Its Parquet load reads `gs://…/dt=2026-11-21/*.parquet` with DuckDB's hive-partition
  detection on, which adds a `dt` column BigQuery would not add (BigQuery only does so when
  the load asks for hivePartitioningOptions), so every load into a fixed schema fails.

`gs://bucket/path` URIs are read from `$BQEMU_GCS_LOCAL_ROOT/bucket/path`.
Usage: python bigquery-emulator.py start [bqemulator start options]
"""

import bqemulator.jobs.executor as executor
import bqemulator.storage.engine as engine
from bqemulator.cli import main


def _no_spatial(self):
    return None


def _load_parquet(path, target_ref, ctx):
    ctx.engine.execute(
        f"INSERT INTO {target_ref} SELECT * FROM read_parquet(?, hive_partitioning = false)",
        [path],
    )


engine.DuckDBEngine._load_spatial = _no_spatial
executor._LOAD_FORMAT_HANDLERS["PARQUET"] = _load_parquet

if __name__ == "__main__":
    main()
