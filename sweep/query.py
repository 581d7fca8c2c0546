"""``sweep query``: SQL (DuckDB) or filter/sort flags over a sweep's Parquet results.

Four views, ``epochs``, ``trials``, ``evals`` (every evaluation set's perplexity per epoch)
and ``tasks`` (zero-shot task metrics), read the Parquet files of every sweep under the path
(``read_parquet([...], union_by_name=true)``); columns of the schema that an older file lacks
read as NULL, so queries written against the current schema keep working.

    sweep query sweeps/demo "SELECT trial_id, min(perplexity) FROM epochs GROUP BY 1"
    sweep query sweeps/demo --table trials --where "status = 'completed'" --sort -sparsity
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import decimal
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import duckdb

from sweep.api import TABLES, find_sweeps, localize, parquet_files

DEFAULT_SORT = {"epochs": "sweep, trial_id, epoch", "trials": "sweep, trial_id",
                "evals": "sweep, trial_id, epoch, set", "tasks": "sweep, trial_id, epoch, task, metric"}
FORMATS = ("table", "csv", "json")


class QueryError(ValueError):
    """A query DuckDB rejected (syntax, unknown column or table); carries DuckDB's message."""


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _view_sql(con: duckdb.DuckDBPyConnection, path: str | os.PathLike, table: str) -> str:
    """SELECT over the schema (an empty typed table) UNION ALL BY NAME each sweep's files."""
    _, schema = TABLES[table]
    empty = f"_{table}_schema"
    con.register(empty, schema.empty_table())
    parts = [f"SELECT * FROM {empty}"]
    for sweep_dir in find_sweeps(path):
        files = parquet_files(sweep_dir, table)
        if files:
            listed = ", ".join(_sql_str(str(f)) for f in files)
            # A row without a sweep name takes its directory's name.
            parts.append(
                f"SELECT * REPLACE (coalesce(sweep, {_sql_str(sweep_dir.name)}) AS sweep) "
                f"FROM read_parquet([{listed}], union_by_name=true)"
            )
    return "\nUNION ALL BY NAME\n".join(parts)


def connect(path: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per table (``epochs``, ``trials``,
    ``evals``, ``tasks``) over ``path``."""
    path = localize(path)  # an object-store URI: its results downloaded once, here
    find_sweeps(path)  # FileNotFoundError naming the path before anything else
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # no ICU extension: timestamps still print, in local time
        pass
    for table in TABLES:
        con.execute(f"CREATE VIEW {table} AS {_view_sql(con, path, table)}")
    return con


def _order_by(sort: str) -> str:
    """``-col`` sorts descending; anything else is passed to ORDER BY as written."""
    items = []
    for item in (s.strip() for s in sort.split(",")):
        if item.startswith("-"):
            items.append(f"{item[1:].strip()} DESC")
        elif item:
            items.append(item)
    return ", ".join(items)


def build_sql(
    sql: str | None = None,
    table: str | None = None,
    where: str | None = None,
    sort: str | None = None,
    limit: int | None = None,
    columns: str | None = None,
) -> str:
    """The statement to run: ``sql`` as given, or SELECT over ``table`` (default epochs);
    the flags wrap either one."""
    if sql and table:
        raise QueryError("give either SQL or --table, not both")
    if table is not None and table not in TABLES:
        raise QueryError(f"unknown table {table!r}: expected one of {', '.join(TABLES)}")
    if not any((table, where, sort, limit is not None, columns)):
        # SQL as given (DESCRIBE, SHOW TABLES and CTEs work too), or the default listing.
        return sql or f"SELECT * FROM epochs ORDER BY {DEFAULT_SORT['epochs']}"
    source = f"({sql.strip().rstrip(';')}) AS q" if sql else (table or "epochs")
    out = f"SELECT {columns or '*'} FROM {source}"
    if where:
        out += f" WHERE {where}"
    if sort or not sql:
        out += f" ORDER BY {_order_by(sort) if sort else DEFAULT_SORT[table or 'epochs']}"
    if limit is not None:
        if limit < 0:
            raise QueryError(f"--limit must be >= 0, got {limit}")
        out += f" LIMIT {int(limit)}"
    return out


def execute(path: str | os.PathLike, sql: str) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` over the sweep(s) at ``path``: (column names, rows)."""
    con = connect(path)
    try:
        cur = con.execute(sql)
        if cur.description is None:
            return [], []
        return [d[0] for d in cur.description], cur.fetchall()
    except duckdb.Error as e:
        raise QueryError(str(e)) from e
    finally:
        con.close()


def format_cell(v: Any) -> str:
    """Compact text for a table cell: NULL empty, NaN ``nan``, floats to 5 significant
    digits, timestamps to the second."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (float, decimal.Decimal)):
        f = float(v)
        if math.isnan(f):
            return "nan"
        return f"{f:.5g}"
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool)


def format_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    footer: bool = True,
    right: Sequence[bool] | None = None,
) -> str:
    """An aligned text table: numbers right-aligned (or as ``right`` says), text left."""
    cells = [[format_cell(v) for v in row] for row in rows]
    if right is None:
        right = [any(_is_number(r[i]) for r in rows) for i in range(len(columns))]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ).rstrip()

    out = [line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    if footer:
        out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _plain(v: Any) -> Any:
    """A JSON-safe value: NaN/inf become null, timestamps ISO 8601, decimals floats."""
    if isinstance(v, decimal.Decimal):
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


def _csv_cell(v: Any) -> Any:
    """NULL empty, NaN ``nan``, floats at full precision (``repr`` round-trips)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return _plain(v)


def format_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table") -> str:
    """Rows as an aligned table, CSV (NULL empty, full float precision) or JSON records."""
    if fmt == "table":
        return format_table(columns, rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for row in rows:
            w.writerow([_csv_cell(v) for v in row])
        return buf.getvalue().rstrip("\n")
    if fmt == "json":
        records = [json.dumps(dict(zip(columns, map(_plain, row), strict=True))) for row in rows]
        return "[\n" + ",\n".join(records) + "\n]" if records else "[]"
    raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")


def run_query(
    path: str | os.PathLike,
    sql: str | None = None,
    fmt: str = "table",
    *,
    table: str | None = None,
    where: str | None = None,
    sort: str | None = None,
    limit: int | None = None,
    columns: str | None = None,
) -> str:
    """Run SQL (or the filter flags) over the sweep(s) at ``path`` and format the rows.

    Raises QueryError for a query DuckDB rejects, FileNotFoundError for a path without results.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    statement = build_sql(sql, table, where, sort, limit, columns)
    names, rows = execute(path, statement)
    return format_rows(names, rows, fmt)


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sweep query``."""
    parser.add_argument("sweep_dir", help="a SWEEP_DIR, a directory holding several sweeps, or either one's object-store URI")
    parser.add_argument(
        "sql",
        nargs="?",
        default=None,
        help="SQL over the views epochs, trials, evals and tasks (default: SELECT * FROM epochs ORDER BY sweep, trial_id, epoch)",
    )
    parser.add_argument(
        "--table", choices=list(TABLES), help="select from this table instead of SQL"
    )
    parser.add_argument(
        "--where", metavar="EXPR", help='SQL condition, e.g. "epoch > 0 AND batch_size = 4"'
    )
    parser.add_argument(
        "--sort", metavar="COL", help="sort columns, comma-separated; -col for descending"
    )
    parser.add_argument("--limit", metavar="N", type=int, help="at most N rows")
    parser.add_argument("--columns", metavar="COLS", help="comma-separated columns to show")
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="output format (default table)"
    )


def run_query_cli(args: argparse.Namespace) -> int:
    """Print the query's rows; 2 with the message on stderr for bad SQL or a missing dir."""
    try:
        out = run_query(
            args.sweep_dir,
            args.sql,
            args.format,
            table=args.table,
            where=args.where,
            sort=args.sort,
            limit=args.limit,
            columns=args.columns,
        )
    except (QueryError, FileNotFoundError) as e:
        print(f"sweep query: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
