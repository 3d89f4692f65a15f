"""Run directories, emergence metrics and cost accounting."""

from r1lab.metrics.emergence import DEFAULT_REFLECTION_WORDS, emergence_stats, reflection_counts
from r1lab.metrics.run import RunDir, atomic_write_text

__all__ = ["DEFAULT_REFLECTION_WORDS", "RunDir", "atomic_write_text", "emergence_stats", "reflection_counts"]
