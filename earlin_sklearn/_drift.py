"""Drift alarms from the edge devices' reports: is a device (or the fleet) accepting what the target TPR predicts?

Rejected inputs never reach the cloud, so a camera whose lens is covered, or
a fleet that meets a new kind of scene, is invisible to the server except
through the edges' own counts. Each report says how many inputs a device saw
and accepted since its last one. On ID inputs each is accepted with
probability ``target_tpr`` (the threshold was set so, on ID data only), so
the accepted count of ``n`` inputs is Binomial(n, target_tpr) and an exact
two-sided binomial test flags a count outside that band. Three tests run on
every report: the report itself, the device's last ``window`` reports
together (slow drift) and the fleet's last ``window`` reports together. Each
has a false-alarm probability of at most ``alpha`` per report on an ID
stream at the target rate; a stream with OOD inputs (the point of the alarm)
or a detector whose rate moved raises it.
"""

import collections
import time

from scipy.stats import binom


def outside_band(accepted, seen, rate, alpha):
    """Whether ``accepted`` of ``seen`` is outside the two-sided ``1 - alpha`` band of Binomial(seen, rate)."""
    if seen <= 0:
        return False
    low = binom.cdf(accepted, seen, rate)  # P(K <= accepted)
    high = binom.sf(accepted - 1, seen, rate)  # P(K >= accepted)
    return bool(min(low, high) < alpha / 2)


class DriftMonitor:
    """Per-device and fleet acceptance counts from edge reports, with binomial drift alarms.

    Parameters
    ----------
    target_tpr : float
        The rate at which the edge accepts ID inputs (the split's).
    alpha : float, default=1e-4
        False-alarm probability of each test per report on an ID stream.
    window : int, default=10
        Reports pooled for the slow-drift tests (per device and fleet-wide).
    max_devices : int, default=10000
        Devices tracked; a report from one more is refused (:class:`TooManyDevices`).
    history : int, default=120
        Reports kept per device, with their time, for the status page; and
        as many of the last alarms.
    """

    def __init__(self, target_tpr, alpha=1e-4, window=10, max_devices=10000, history=120):
        if not 0 < float(target_tpr) <= 1:
            raise ValueError(f"target_tpr must be in (0, 1]; got {target_tpr}.")
        self.rate, self.alpha, self.window, self.max_devices = float(target_tpr), float(alpha), int(window), int(max_devices)
        self.devices = {}  # device -> deque of (seen, accepted) of its last reports
        self.totals = collections.defaultdict(lambda: [0, 0])  # device -> [seen, accepted] since it started
        self.fleet = collections.deque(maxlen=self.window)
        self.alarms = collections.Counter()  # scope -> alarms raised
        self.history = int(history)
        self.timeline = {}  # device -> deque of (time, seen, accepted) of its last `history` reports
        self.alarm_log = collections.deque(maxlen=self.history)  # (time, device, scope, seen, accepted)

    def report(self, device, seen, accepted, now=None):
        """Record one report (at time ``now``, default the clock's); the alarms it raises (``"report"``, ``"device"``,
        ``"fleet"``)."""
        now = time.time() if now is None else float(now)
        if device not in self.devices:
            if len(self.devices) >= self.max_devices:
                raise TooManyDevices(f"already {len(self.devices)} devices reporting (the limit is {self.max_devices})")
            self.devices[device] = collections.deque(maxlen=self.window)
            self.timeline[device] = collections.deque(maxlen=self.history)
        self.timeline[device].append((now, seen, accepted))
        history = self.devices[device]
        history.append((seen, accepted))
        self.fleet.append((seen, accepted))
        self.totals[device][0] += seen
        self.totals[device][1] += accepted
        alarms = []
        if outside_band(accepted, seen, self.rate, self.alpha):
            alarms.append("report")
        if len(history) > 1 and outside_band(sum(a for _, a in history), sum(s for s, _ in history), self.rate,
                                             self.alpha):
            alarms.append("device")
        if len(self.fleet) > 1 and outside_band(sum(a for _, a in self.fleet), sum(s for s, _ in self.fleet),
                                                self.rate, self.alpha):
            alarms.append("fleet")
        for scope in alarms:
            self.alarms[scope] += 1
            self.alarm_log.append((now, device, scope, seen, accepted))
        return alarms

    def fleet_rate(self):
        """Acceptance rate over the fleet's last ``window`` reports (NaN before any)."""
        seen = sum(s for s, _ in self.fleet)
        return sum(a for _, a in self.fleet) / seen if seen else float("nan")


class TooManyDevices(Exception):
    """A report from one device more than the monitor tracks."""
