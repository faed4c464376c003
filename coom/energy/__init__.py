"""Energy metering."""
