"""Renderings of results: SARIF for CI, a self-contained HTML report for people."""
