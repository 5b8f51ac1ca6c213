"""Benchmarks of kronlayers against dense layers and peer libraries (not tests)."""
