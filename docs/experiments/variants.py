"""Synthetic-set variants for probe.py. v5 is the shipped set (data._render); field and objtex are candidates."""
import numpy as np
import data
from data import SYNTHETIC_CLASSES, _SHAPES

def v5(rng, cls, F, S):
    return data._render(rng, cls, F, S)

def _warp(name, rng, F, S, xx, yy, speed=(1.0, 1.5), omega=(5, 8), zoom=(0.7, 1.4)):
    """coords (F, S, S) of the static texture seen at each pixel, for the class motion about the frame centre."""
    t = np.arange(F, dtype=np.float32)[:, None, None]
    x, y = xx[None] - S / 2, yy[None] - S / 2
    if name.startswith('Move'):
        d = {'MoveLeft': (-1, 0), 'MoveRight': (1, 0), 'MoveUp': (0, -1), 'MoveDown': (0, 1)}[name]
        sp = rng.uniform(*speed)
        return x - d[0] * sp * t, y - d[1] * sp * t
    if name.startswith('Rotate'):
        a = -(1 if name == 'RotateClockwise' else -1) * np.deg2rad(rng.uniform(*omega)) * t
        return np.cos(a) * x - np.sin(a) * y, np.sin(a) * x + np.cos(a) * y
    g = t / max(F - 1, 1)
    lo, hi = zoom
    s = lo * (hi / lo) ** (g if name == 'Approach' else 1 - g)     # magnification
    return x / s, y / s

def _waves(rng, n, cyc, S):
    f = rng.uniform(*cyc, n) / S * 2 * np.pi
    a = rng.uniform(0, 2 * np.pi, n)
    return f * np.cos(a), f * np.sin(a), rng.uniform(0, 2 * np.pi, n), rng.uniform(-1, 1, (n, 3))

def _tex(u, v, w):
    kx, ky, ph, col = w
    out = 0
    for i in range(len(kx)):
        out = out + np.cos(kx[i] * u + ky[i] * v + ph[i])[..., None] * col[i]
    return out

def field(rng, cls, F, S, n=4, cyc=(2, 4), amp=60.0, noise=1.0):
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    u, v = _warp(SYNTHETIC_CLASSES[cls], rng, F, S, xx, yy)
    fr = 127.5 + amp * _tex(u, v, _waves(rng, n, cyc, S)) / np.sqrt(n / 2)
    fr = fr + noise * rng.standard_normal((F, S, S, 1))
    return np.clip(fr, 0, 255).astype(np.uint8)

def objtex(rng, cls, F, S, k=3, r=(14, 22), bg_amp=30.0, amp=70.0, cyc=(1, 2), bg_cyc=(1, 2), noise=1.0, shapes=True):
    """k big objects with a smooth texture fixed to each, doing the class motion about their own centres,
    over a static smooth texture."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    name = SYNTHETIC_CLASSES[cls]
    fr = np.broadcast_to(127.5 + bg_amp * _tex(xx, yy, _waves(rng, 3, bg_cyc, S)) / np.sqrt(1.5), (F, S, S, 3)).copy()
    t = np.arange(F, dtype=np.float32)
    for _ in range(k):
        shape = rng.integers(0, len(_SHAPES)) if shapes else 0
        centre = np.broadcast_to(rng.uniform(0, S, 2), (F, 2)).astype(np.float32)
        theta = np.full(F, rng.uniform(0, 2 * np.pi), np.float32)
        rad = np.full(F, rng.uniform(*r), np.float32)
        if name.startswith('Move'):
            d = {'MoveLeft': (-1, 0), 'MoveRight': (1, 0), 'MoveUp': (0, -1), 'MoveDown': (0, 1)}[name]
            centre = centre + np.outer(t, d).astype(np.float32) * rng.uniform(1.0, 1.5)
        elif name.startswith('Rotate'):
            theta = theta + (1 if name == 'RotateClockwise' else -1) * np.deg2rad(rng.uniform(5, 8)) * t
        else:
            lo, hi = r[0] * 0.45, r[1] * 1.0
            g = t / max(F - 1, 1)
            rad = (lo * (hi / lo) ** (g if name == 'Approach' else 1 - g)).astype(np.float32)
        dx = (xx - centre[:, 0, None, None] + S / 2) % S - S / 2
        dy = (yy - centre[:, 1, None, None] + S / 2) % S - S / 2
        c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        u, v = (c * dx + s * dy) / rad[:, None, None], (-s * dx + c * dy) / rad[:, None, None]
        inside = _SHAPES[shape](u, v, np.abs(u), np.abs(v)) if shapes else (u * u + v * v < 1)
        w = _waves(rng, 3, (cyc[0] * 2 * np.pi * 10 / S, cyc[1] * 2 * np.pi * 10 / S), S)  # cycles per radius
        tex = 127.5 + amp * _tex(u * 10, v * 10, w) / np.sqrt(1.5)
        fr = np.where(inside[..., None], tex, fr)
    fr = fr + noise * rng.standard_normal((F, S, S, 1))
    return np.clip(fr, 0, 255).astype(np.uint8)
