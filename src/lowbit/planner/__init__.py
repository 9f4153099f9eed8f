"""The memory planner: a run's peak memory from config.json and the settings, before anything loads."""
