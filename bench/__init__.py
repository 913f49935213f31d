"""Measurements: load and conversion timings, training throughput."""
