"""Reports: summary.json (summary.py), report.html of a run and of a search (run.py),
fidelity.html (fidelity.py), and the HTML building blocks they share (html.py)."""

from demix.report.fidelity import write_fidelity_report
from demix.report.run import write_report, write_search_report
from demix.report.summary import print_summary, summarize, write_summary

__all__ = [
    "print_summary",
    "summarize",
    "write_fidelity_report",
    "write_report",
    "write_search_report",
    "write_summary",
]
