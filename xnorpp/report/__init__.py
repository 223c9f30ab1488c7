"""Sweep reports, offline: ``python -m xnorpp.report PATH [PATH ...] [--baseline CONFIG] [--html FILE]``.

:mod:`.table` reads run directories and summarises them (markdown table, plot, statistics, failed runs),
:mod:`.html` writes the self-contained HTML page, :mod:`.cli` is the command line.
"""

from .table import (
    ERROR_LOG,
    LAUNCH,
    RecordFailure,
    Reference,
    Row,
    Run,
    collect_runs,
    compare_rows,
    failed_section,
    markdown_table,
    pick_baselines,
    plot,
    render,
    summarise,
    table_cells,
    varying_keys,
)

__all__ = [
    "ERROR_LOG",
    "LAUNCH",
    "RecordFailure",
    "Reference",
    "Row",
    "Run",
    "collect_runs",
    "compare_rows",
    "failed_section",
    "markdown_table",
    "pick_baselines",
    "plot",
    "render",
    "summarise",
    "table_cells",
    "varying_keys",
]
