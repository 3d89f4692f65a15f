"""The HTML report of run directories: curves over steps, evaluation and cost tables, example traces."""

from r1lab.report.data import ReportError, RunData, load_run
from r1lab.report.html import render, write_report

__all__ = ["ReportError", "RunData", "load_run", "render", "write_report"]
