"""A driven, damped harmonic oscillator, integrated with numpy (classical RK4).

    x'' + 2*zeta*omega0*x' + omega0**2 * x = force * cos(omega * t)

`run(zeta, omega, force)` integrates from rest for `T` seconds and returns what a resonance
study looks at: the steady-state amplitude (over the last quarter of the time), the peak
displacement, and the mean energy. Over a grid of damping ratios and drive frequencies, the
amplitude peaks near omega = omega0 * sqrt(1 - 2 zeta^2) (the resonance curve).
"""

from __future__ import annotations

import numpy as np

OMEGA0 = 1.0  # natural frequency (rad/s)
T = 60.0  # seconds simulated
DT = 0.01  # RK4 step


def _accel(x: np.ndarray, v: np.ndarray, t: float, zeta: float, omega: float,
           force: float) -> np.ndarray:
    return force * np.cos(omega * t) - 2 * zeta * OMEGA0 * v - OMEGA0 ** 2 * x


def simulate(zeta: float, omega: float, force: float = 1.0) -> np.ndarray:
    """Displacement x(t) at every step, from x = v = 0."""
    n = int(T / DT)
    xs = np.empty(n)
    x = v = 0.0
    for i in range(n):
        t = i * DT
        k1x, k1v = v, _accel(x, v, t, zeta, omega, force)
        k2x, k2v = v + 0.5 * DT * k1v, _accel(x + 0.5 * DT * k1x, v + 0.5 * DT * k1v,
                                               t + 0.5 * DT, zeta, omega, force)
        k3x, k3v = v + 0.5 * DT * k2v, _accel(x + 0.5 * DT * k2x, v + 0.5 * DT * k2v,
                                               t + 0.5 * DT, zeta, omega, force)
        k4x, k4v = v + DT * k3v, _accel(x + DT * k3x, v + DT * k3v, t + DT, zeta, omega, force)
        x += DT / 6 * (k1x + 2 * k2x + 2 * k3x + k4x)
        v += DT / 6 * (k1v + 2 * k2v + 2 * k3v + k4v)
        xs[i] = x
    return xs


def run(zeta: float, omega: float, force: float = 1.0) -> dict:
    if zeta <= 0:
        raise ValueError(f"zeta must be > 0, got {zeta}")
    xs = simulate(zeta, omega, force)
    tail = xs[-len(xs) // 4:]
    amplitude = float((tail.max() - tail.min()) / 2)
    return {
        "amplitude": amplitude,
        "peak": float(np.abs(xs).max()),
        "energy": float(0.5 * OMEGA0 ** 2 * np.mean(tail ** 2)),
        "resonant": bool(abs(omega - OMEGA0 * np.sqrt(max(1 - 2 * zeta ** 2, 0))) < 0.1),
    }
