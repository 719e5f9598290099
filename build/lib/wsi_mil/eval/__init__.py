"""Metrics, decision thresholds, reports and plots."""
