"""Reports: summary.json (summary.py), report.html of a run and of a search (run.py),
fidelity.html (fidelity.py), training curves (curves.py), and the HTML building blocks they
share (html.py).

The names below are imported on first use (demix.lazy)."""

from demix.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "curves_section": "demix.report.curves",
        "print_summary": "demix.report.summary",
        "summarize": "demix.report.summary",
        "write_curves_page": "demix.report.curves",
        "write_fidelity_report": "demix.report.fidelity",
        "write_report": "demix.report.run",
        "write_search_report": "demix.report.run",
        "write_summary": "demix.report.summary",
    },
)

__all__ = [
    "curves_section",
    "print_summary",
    "summarize",
    "write_curves_page",
    "write_fidelity_report",
    "write_report",
    "write_search_report",
    "write_summary",
]
