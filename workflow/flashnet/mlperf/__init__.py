"""MLPerf's yardstick: the closed-division rules a run meets or breaks, and the mllog format."""
