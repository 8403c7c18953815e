"""Checking a composed config against its targets' signatures, without importing them (``check.py``)."""

from ftlab.checks.check import check_config, find_problems, load_schema

__all__ = ["check_config", "find_problems", "load_schema"]
