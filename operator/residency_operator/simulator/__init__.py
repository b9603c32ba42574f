"""Trace-driven simulator of a GPU cluster, comparing residency's planner with today's policies.

It uses the production predictor, cost model and :func:`residency_operator.planner.plan`.
"""
