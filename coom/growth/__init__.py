"""Progressive model expansion: growth operators that keep what a model
computes, and growth schedules applied while it trains."""
