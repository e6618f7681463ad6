"""Real-data converters to the day-record format (CLI: python -m lsm2.data.convert)."""
