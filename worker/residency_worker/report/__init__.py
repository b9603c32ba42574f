"""`residency report`: the study's findings measured with our engine, next to the peers, in one run."""

from residency_worker.report.measure import ReportSettings, Shape
from residency_worker.report.run import run_report

__all__ = ["ReportSettings", "Shape", "run_report"]
