"""Reporting: tables, findings, report.md, figures."""
