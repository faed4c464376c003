"""Which steps may update the weights: a step whose loss or gradient norm
is not finite never does, and a spike does what train.anomaly.spike
says.

A spike is a loss or gradient norm more than ``deviations`` standard
deviations above the mean of the latest ``window`` accepted steps, once
``min_steps`` of them are known; only upward moves count. The windows
are part of the checkpoint, so a resumed run judges its steps as the
uninterrupted one did.
"""
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Optional

from coom.config.anomaly import AnomalyConfig
from coom.errors import UserError

SKIP, ROLLBACK, LOG = "skip", "rollback", "log"


@dataclass(frozen=True)
class Anomaly:
    """What was wrong with a step, and what the run does about it."""

    kind: str
    """'not finite', 'loss spike' or 'grad_norm spike'."""

    action: str
    """SKIP, ROLLBACK or LOG."""

    deviations: Optional[float] = None
    """How far above the window's mean a spike lies, in deviations."""

    def record(self) -> dict:
        """Its fields in a metrics.jsonl record."""
        record = {"anomaly": self.kind, "anomaly_action": self.action}
        if self.deviations is not None:
            record["anomaly_deviations"] = self.deviations
        return record


class AnomalyGuard:
    """Judges each step's loss and gradient norm against the windows of
    the steps accepted before it."""

    def __init__(self, config: AnomalyConfig):
        self.config = config
        self.windows = {name: deque(maxlen=config.window)
                        for name in ("loss", "grad_norm")}
        self.in_a_row = 0
        """Steps skipped or rolled back since the last applied one."""

    @property
    def holds_back_spikes(self) -> bool:
        """Whether a spike keeps its step from the weights (the spike
        policies skip and rollback); otherwise only a loss or gradient
        norm that is not finite does."""
        return self.config.spike in (SKIP, ROLLBACK)

    def _deviations(self, name: str, value: float) -> Optional[float]:
        window = self.windows[name]
        if len(window) < self.config.min_steps:
            return None
        spread = statistics.pstdev(window)
        excess = value - statistics.fmean(window)
        if spread == 0:
            return math.inf if excess > 0 else None
        return excess / spread

    def judge(self, loss: float, grad_norm: float) -> Optional[Anomaly]:
        """The step's anomaly, if any; a step judged SKIP or ROLLBACK
        must not update the weights. Raises a UserError once
        max_in_a_row steps in a row were kept from doing so."""
        anomaly = self._anomaly(loss, grad_norm)
        if anomaly is None or anomaly.action == LOG:
            self.in_a_row = 0
            self.windows["loss"].append(loss)
            self.windows["grad_norm"].append(grad_norm)
            return anomaly
        self.in_a_row += 1
        if self.in_a_row >= self.config.max_in_a_row:
            raise UserError(
                f"training diverged: {self.in_a_row} steps in a row had "
                f"a {anomaly.kind} (loss {loss:g}, gradient norm "
                f"{grad_norm:g}); resume from an earlier checkpoint with "
                "a lower optimizer.lr, or see docs/resilience.md")
        return anomaly

    def _anomaly(self, loss: float, grad_norm: float) -> Optional[Anomaly]:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Anomaly("not finite", SKIP)
        if self.config.spike == "off":
            return None
        for name, value in (("loss", loss), ("grad_norm", grad_norm)):
            deviations = self._deviations(name, value)
            if deviations is not None \
                    and deviations > self.config.deviations:
                return Anomaly(f"{name} spike", self.config.spike,
                               deviations)
        return None

    def state_dict(self) -> dict:
        return {"windows": {name: list(window)
                            for name, window in self.windows.items()},
                "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """A checkpoint's windows; None (a checkpoint from before the
        guard) starts them empty."""
        state = state or {"windows": {}, "in_a_row": 0}
        for name, window in self.windows.items():
            window.clear()
            window.extend(state["windows"].get(name, []))
        self.in_a_row = state["in_a_row"]
