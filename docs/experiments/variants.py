"""Synthetic-set variants for probe.py: v5 (the set shipped before v6), field (v6 is field with cyc=(0.5, 1.5))."""
import numpy as np

from data import SYNTHETIC_CLASSES

# v5, the shipped set until v6 (data._render at commit 58afd6c), kept here to reproduce its numbers.
_SHAPES = [  # (u, v, |u|, |v|) in the shape's own frame, radius 1 -> mask; asymmetric so that rotation shows
    lambda u, v, au, av: (v >= -0.7) & (v <= 1) & (au <= (1 - v) * 0.6),                          # triangle
    lambda u, v, au, av: ((u >= -1) & (u <= -0.4) & (av <= 1)) | ((v >= 0.4) & (v <= 1) & (au <= 1)),  # L
    lambda u, v, au, av: ((v >= -1) & (v <= -0.5) & (au <= 1)) | ((au <= 0.3) & (av <= 1)),       # T
    lambda u, v, au, av: (u * u + v * v <= 1) & (v >= 0),                                         # half disc
    lambda u, v, au, av: (np.maximum(au, av) <= 1) & ~((u > 0.1) & (v > 0.1)),                    # notched square
]


def v5(rng, cls, F, S, num_shapes=6):
    """One video (F, S, S, 3) uint8 of class `cls`: num_shapes striped shapes on a flat grey background, all
    doing the class's motion (each about its own centre for rotation and scale). Everything lives on a torus
    (wrap-around), so position, size, colour and pose are distributed alike in every class: only motion tells
    the classes apart. Why this design (v5), measured (README, "Does pre-training help?"): every shape carries
    the class, so most cubes hold motion evidence, and a from-scratch ViT learns it in ~1000 steps; v4's single
    shape on strong drifting colour waves was learnt by no ViT in CPU minutes. Known weakness: per-cube
    normalised targets turn the flat background into noise, and pre-training on v5 stays on the plateau."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    frames = np.full((F, S, S, 3), 127.5, np.float32)
    name, t = SYNTHETIC_CLASSES[cls], np.arange(F, dtype=np.float32)
    for _ in range(num_shapes):
        shape = rng.integers(0, len(_SHAPES))
        colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        centre = np.broadcast_to(rng.uniform(0, S, 2), (F, 2)).astype(np.float32)
        theta = np.full(F, rng.uniform(0, 2 * np.pi), np.float32)
        speed, omega = rng.uniform(1.0, 1.5), np.deg2rad(rng.uniform(5, 8))   # px / frame, rad / frame
        r = np.full(F, rng.uniform(7, 11), np.float32)
        if name.startswith('Move'):
            d = {'MoveLeft': (-1, 0), 'MoveRight': (1, 0), 'MoveUp': (0, -1), 'MoveDown': (0, 1)}[name]
            centre = centre + np.outer(t, d).astype(np.float32) * speed
        elif name.startswith('Rotate'):
            theta = theta + (1 if name == 'RotateClockwise' else -1) * omega * t  # y points down: +angle = cw
        else:  # radius grows (Approach) or shrinks (Recede) geometrically between the same two limits
            lo, hi = rng.uniform(4.2, 5.6), rng.uniform(13.2, 16.5)
            g = t / max(F - 1, 1)
            r = (lo * (hi / lo) ** (g if name == 'Approach' else 1 - g)).astype(np.float32)
        dx = (xx - centre[:, 0, None, None] + S / 2) % S - S / 2                  # (F, S, S) torus offsets
        dy = (yy - centre[:, 1, None, None] + S / 2) % S - S / 2
        c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        u, v = (c * dx + s * dy) / r[:, None, None], (-s * dx + c * dy) / r[:, None, None]
        inside = _SHAPES[shape](u, v, np.abs(u), np.abs(v))
        # stripes fixed to the shape (1.5 periods per radius): its pose shows inside it, not only at its edge
        stripes = (0.5 + 0.5 * np.cos(3 * np.pi * u))[..., None]
        frames = np.where(inside[..., None], colours[0] * stripes + colours[1] * (1 - stripes), frames)
    frames += rng.standard_normal((F, S, S, 1), dtype=np.float32)  # sensor-like noise, std 1 level
    return np.clip(frames, 0, 255).astype(np.uint8)


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
