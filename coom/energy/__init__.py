"""Energy metering, budgets and energy-aware settings (docs/energy.md).

- ``counter``: cumulative joules from hardware counters that wrap around.
- ``nvml`` and ``rapl``: the GPU's and the CPU packages' counters.
- ``meter``: the counters one process reads.
- ``ledger``: a run's energy by phase and source, summed over processes,
  with its budget.
- ``tradeoff``: Zeus's cost and the Pareto front of energy and time.
- ``power``: the opt-in search over GPU power limits.

``coom bench --energy-sweep`` is a tool above training
(``coom.tools.sweep``).
"""
