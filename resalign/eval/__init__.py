"""Evaluation: batched generation, scoring, statistics, reports and plots."""
