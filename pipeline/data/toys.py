"""The 50 toys of synthetic_norb: 5 categories x 10 instances, built from ellipsoids, boxes and cylinders.

Categories follow small-NORB's order: 0 four-legged animals, 1 human figures, 2 airplanes, 3 trucks, 4 cars.
The instances of a category differ in shape, not only in size (a giraffe and a dachshund, a T-pose and a
runner, a glider and a delta fighter, a tanker and a cement mixer, an F1 car and a minivan).

Toy frame: x = the toy's front, y = its left, z = up. `toy()` centres each toy and scales it to unit radius,
so size is never a cue. The designs are fixed (they do not depend on any seed): instance 3 of the animals is
always the elephant.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from pipeline.data.render import BOX, CYLINDER, ELLIPSOID, Part

CATEGORY_NAMES = ["animal", "human", "airplane", "truck", "car"]
TYRE = 0.3  # relative albedo of tyres; other accents use 0.55..1.3


# ---------------------------------------------------------------- primitive helpers


def _v(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _unit(x) -> np.ndarray:
    x = _v(x)
    return x / np.linalg.norm(x)


def _rot_y(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_x(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _frame(axis) -> np.ndarray:
    """A rotation whose third column is `axis` (for cylinders)."""
    z = _unit(axis)
    helper = np.array([1.0, 0, 0]) if abs(z[0]) < 0.9 else np.array([0, 1.0, 0])
    x = _unit(np.cross(helper, z))
    return np.stack([x, np.cross(z, x), z], 1)


def ell(center, radii, rot=None, albedo=1.0) -> Part:
    rot = np.eye(3) if rot is None else rot
    return Part(ELLIPSOID, _v(center), rot @ np.diag(radii), albedo)


def box(center, half, rot=None, albedo=1.0, lean=0.0) -> Part:
    """A box; `lean` shears its top forward (+x) by lean * half-height (slanted windscreens, cab fronts)."""
    rot = np.eye(3) if rot is None else rot
    m = np.diag(_v(half))
    m[0, 2] = lean * half[2]
    return Part(BOX, _v(center), rot @ m, albedo)


def plate(center, ax0, ax1, thick, albedo=1.0) -> Part:
    """A thin parallelogram plate with half-axes ax0, ax1 (wings, fins, ears)."""
    ax0, ax1 = _v(ax0), _v(ax1)
    n = _unit(np.cross(ax0, ax1)) * thick
    return Part(BOX, _v(center), np.stack([ax0, ax1, n], 1), albedo)


def rod(p0, p1, radius, albedo=1.0) -> Part:
    """A cylinder from point p0 to point p1."""
    p0, p1 = _v(p0), _v(p1)
    half = np.linalg.norm(p1 - p0) / 2
    return Part(CYLINDER, (p0 + p1) / 2, _frame(p1 - p0) @ np.diag([radius, radius, half]), albedo)


def disc(center, axis, radius, half_thick, albedo=1.0) -> Part:
    return Part(CYLINDER, _v(center), _frame(axis) @ np.diag([radius, radius, half_thick]), albedo)


def wheels(xs, track, radius, width=0.07, z=None) -> list[Part]:
    z = radius if z is None else z
    return [disc((x, s * track, z), (0, 1, 0), radius, width, TYRE) for x in xs for s in (1, -1)]


def wing(root, span, chord, sweep=0.0, dihedral=0.0, thick=0.025, side=1, albedo=1.0) -> Part:
    """One half-wing: a parallelogram from `root` (mid-chord at the root) outwards, swept back by `sweep` deg."""
    span_axis = np.array([-np.tan(np.radians(sweep)), side, np.tan(np.radians(dihedral))]) * span / 2
    return plate(_v(root) + span_axis, (chord / 2, 0, 0), span_axis, thick, albedo)


def fin(root, height, chord, sweep=35.0, thick=0.02, tilt=0.0) -> Part:
    """A vertical tail fin rising from `root`, its top swept back; `tilt` leans it sideways (twin fins)."""
    up = np.array([-np.tan(np.radians(sweep)), np.sin(np.radians(tilt)), np.cos(np.radians(tilt))]) * height / 2
    return plate(_v(root) + up, (chord / 2, 0, 0), up, thick)


# ---------------------------------------------------------------- 0: four-legged animals

_ANIMALS = [
    # body (L, W, H), legs (length, radius), neck (length, radius, angle), head (L, W, H, pitch), tail (L, r, angle)
    dict(body=(1.0, .34, .36), leg=(.70, .055), neck=(.45, .09, 55), head=(.38, .14, .16, -35), tail=(.45, .035, -60), extras=("ears",)),
    dict(body=(.75, .30, .36), leg=(1.05, .05), neck=(1.0, .07, 72), head=(.28, .11, .12, -20), tail=(.3, .025, -70), extras=("ossicones",)),
    dict(body=(1.1, .22, .22), leg=(.20, .05), neck=(.15, .08, 30), head=(.34, .13, .13, -10), tail=(.32, .03, 15), extras=("floppy_ears",)),
    dict(body=(1.05, .60, .58), leg=(.50, .14), neck=(.05, .2, 20), head=(.40, .36, .40, 0), tail=(.25, .025, -75), extras=("trunk", "big_ears")),
    dict(body=(.70, .20, .22), leg=(.33, .04), neck=(.12, .07, 50), head=(.18, .17, .16, 0), tail=(.60, .03, 70), extras=("pointy_ears",)),
    dict(body=(.85, .32, .34), leg=(.45, .07), neck=(.12, .12, 30), head=(.26, .22, .22, 0), tail=(.55, .03, -20), extras=("mane", "tuft")),
    dict(body=(.80, .25, .28), leg=(.80, .035), neck=(.42, .07, 60), head=(.28, .11, .12, -25), tail=(.12, .03, 30), extras=("antlers",)),
    dict(body=(1.0, .46, .46), leg=(.34, .11), neck=(.12, .16, 5), head=(.46, .22, .24, -15), tail=(.18, .03, -60), extras=("horn", "ears")),
    dict(body=(1.0, .52, .46), leg=(.22, .12), neck=(0, 0, 0), head=(.44, .34, .28, -10), tail=(.15, .03, -40), extras=("ears",)),
    dict(body=(.95, .32, .36), leg=(.85, .05), neck=(.55, .07, 25), head=(.30, .12, .12, 10), tail=(.30, .03, -70), extras=("humps",)),
]


def _animal(p: dict) -> list[Part]:
    length, width, height = p["body"]
    leg_len, leg_r = p["leg"]
    z = leg_len + height * 0.3
    parts = [ell((0, 0, z), (length / 2, width / 2, height / 2))]
    inset = max(1.3 * leg_r, 0.13 * length)
    for sx in (1, -1):
        for sy in (1, -1):
            top = (sx * (length / 2 - inset), sy * (width / 2 - leg_r * 1.1), z)
            parts.append(rod(top, (top[0] + sx * 0.03, top[1], 0), leg_r))
    neck_len, neck_r, neck_angle = p["neck"]
    base = _v((length / 2 * 0.78, 0, z + height * 0.15))
    tip = base + neck_len * _v((np.cos(np.radians(neck_angle)), 0, np.sin(np.radians(neck_angle))))
    if neck_len > 0:
        parts.append(rod(base, tip, neck_r))
    head_l, head_w, head_h, pitch = p["head"]
    rot = _rot_y(-pitch)  # positive pitch = nose up
    head = tip + rot @ _v((head_l * 0.35, 0, head_h * 0.1))
    parts.append(ell(head, (head_l / 2, head_w / 2, head_h / 2), rot))
    nose = head + rot @ _v((head_l / 2, 0, 0))
    crown = head + _v((0, 0, head_h / 2))
    tail_len, tail_r, tail_angle = p["tail"]
    back = _v((-length / 2 * 0.95, 0, z + height * 0.2))
    tail_tip = back + tail_len * _v((-np.cos(np.radians(tail_angle)), 0, np.sin(np.radians(tail_angle))))
    parts.append(rod(back, tail_tip, tail_r))
    for extra in p["extras"]:
        parts += _ANIMAL_EXTRAS[extra](head, crown, nose, tail_tip, p)
    return parts


def _pair(make) -> list[Part]:
    return [make(1), make(-1)]


_ANIMAL_EXTRAS = {
    "ears": lambda h, c, n, t, p: _pair(lambda s: ell(c + (-.03, s * .06, .02), (.03, .025, .06))),
    "ossicones": lambda h, c, n, t, p: _pair(lambda s: rod(c + (-.03, s * .04, 0), c + (-.05, s * .05, .12), .018)),
    "floppy_ears": lambda h, c, n, t, p: _pair(lambda s: ell(h + (-.04, s * .08, -.05), (.06, .02, .09))),
    "trunk": lambda h, c, n, t, p: [rod(n - (.04, 0, 0), n + (.08, 0, -.55), .07)],
    "big_ears": lambda h, c, n, t, p: _pair(lambda s: ell(h + (-.1, s * .2, .02), (.04, .2, .24), albedo=.9)),
    "pointy_ears": lambda h, c, n, t, p: _pair(lambda s: box(c + (0, s * .05, .03), (.015, .035, .045), _rot_x(-s * 20))),
    "antlers": lambda h, c, n, t, p: [
        r
        for s in (1, -1)
        for r in (
            rod(c + (-.02, s * .04, 0), c + (-.12, s * .16, .32), .017),
            rod(c + (-.07, s * .10, .16), c + (.06, s * .16, .28), .014),
            rod(c + (-.1, s * .14, .26), c + (-.24, s * .24, .32), .014),
        )
    ],
    "horn": lambda h, c, n, t, p: [rod(n - (.06, 0, -.05), n + (.04, 0, .24), .04), rod(n - (.16, 0, -.09), n - (.12, 0, -.2), .03)],
    "mane": lambda h, c, n, t, p: [ell(h - (.08, 0, 0), (.14, .2, .22), albedo=.75)],
    "tuft": lambda h, c, n, t, p: [ell(t, (.05, .05, .05), albedo=.75)],
    "humps": lambda h, c, n, t, p: [
        ell((x, 0, p["leg"][0] + p["body"][2] * .75), (.14, .12, .18)) for x in (.18, -.18)
    ],
}


# ---------------------------------------------------------------- 1: human figures

# Upper then lower segment directions of a limb on the figure's left (+y); the right side mirrors y.
_ARM = {
    "down": ((0, .12, -1), (0, .05, -1)),
    "up": ((0, .45, 1), (0, .3, 1)),
    "T": ((0, 1, 0), (0, 1, 0)),
    "wave": ((0, 1, .15), (0, .1, 1)),
    "out_low": ((0, .7, -.7), (0, .6, -.8)),
    "swing_fwd": ((.45, .1, -.9), (.6, .05, -.6)),
    "swing_back": ((-.45, .1, -.9), (-.3, .05, -.95)),
    "run_fwd": ((.5, .1, -.85), (.85, 0, .5)),
    "run_back": ((-.7, .1, -.7), (.5, 0, -.5)),
    "hip": ((-.15, .8, -.6), (.35, -.75, -.5)),
    "diag_up": ((0, .8, .6), (0, .8, .6)),
    "point": ((1, .05, 0), (1, 0, 0)),
}
_LEG = {
    "stand": ((0, .05, -1), (0, 0, -1)),
    "stride_fwd": ((.4, 0, -.92), (.25, 0, -1)),
    "stride_back": ((-.4, 0, -.92), (-.5, 0, -.87)),
    "run_fwd": ((.85, 0, -.5), (0, 0, -1)),
    "run_back": ((-.3, 0, -.95), (-.95, 0, -.3)),
    "wide": ((0, .55, -.85), (0, .5, -.87)),
    "wide_small": ((0, .25, -1), (0, .2, -1)),
}
_HUMANS = [
    dict(arms=("down", "down"), legs=("stand", "stand")),
    dict(arms=("up", "up"), legs=("stand", "stand")),
    dict(arms=("T", "T"), legs=("stand", "stand"), torso=(.22, .44, .62)),
    dict(arms=("swing_fwd", "swing_back"), legs=("stride_back", "stride_fwd")),
    dict(arms=("wave", "down"), legs=("stand", "stand"), torso=(.34, .62, .6), limb=.09, head=.15),
    dict(arms=("out_low", "out_low"), legs=("stand", "stand"), extras=("skirt",)),
    dict(arms=("run_fwd", "run_back"), legs=("run_back", "run_fwd"), lean=18),
    dict(arms=("hip", "hip"), legs=("wide_small", "wide_small")),
    dict(arms=("diag_up", "diag_up"), legs=("wide", "wide")),
    dict(arms=("point", "down"), legs=("stand", "stand"), extras=("hat",), torso=(.2, .38, .72), leg=1.0, limb=.05),
]


def _limb(start, dirs, lengths, radius, side) -> tuple[list[Part], np.ndarray]:
    mirror = _v((1, side, 1))
    joint = _v(start)
    parts = []
    for d, length in zip(dirs, lengths):
        end = joint + length * _unit(_v(d) * mirror)
        parts += [rod(joint, end, radius), ell(end, (radius, radius, radius))]
        joint = end
    return parts, joint


def _human(p: dict) -> list[Part]:
    depth, width, torso_len = p.get("torso", (.24, .48, .65))
    leg_len, r, head_r = p.get("leg", .85), p.get("limb", .065), p.get("head", .13)
    lower: list[Part] = []
    for side, pose in zip((1, -1), p["legs"]):
        limb, ankle = _limb((0, side * width * .25, leg_len), _LEG[pose], (leg_len * .5, leg_len * .5), r * 1.2, side)
        lower += limb + [box(ankle + (.06, 0, -.02), (.1, .05, .035))]
    hip = _v((0, 0, leg_len))
    upper = [box(hip + (0, 0, torso_len / 2), (depth / 2, width / 2, torso_len / 2)), ell(hip, (depth / 2, width * .45, .08))]
    neck = hip + (0, 0, torso_len)
    upper += [rod(neck, neck + (0, 0, .06), .05), ell(neck + (0, 0, .06 + head_r), (head_r * .95, head_r * .9, head_r * 1.1))]
    for side, pose in zip((1, -1), p["arms"]):
        shoulder = hip + (0, side * (width / 2 + r), torso_len - r)
        upper += _limb(shoulder, _ARM[pose], (.32, .3), r, side)[0]
    if "hat" in p.get("extras", ()):
        top = neck + (0, 0, .06 + 2 * head_r)
        upper += [disc(top - (0, 0, .03), (0, 0, 1), .2, .012, .6), disc(top + (0, 0, .06), (0, 0, 1), .11, .08, .6)]
    if "skirt" in p.get("extras", ()):
        upper.append(ell(hip - (0, 0, .12), (.3, .36, .32), albedo=.85))
    lean = p.get("lean", 0)
    if lean:
        rot = _rot_y(lean)
        upper = [Part(q.kind, hip + rot @ (q.center - hip), rot @ q.matrix, q.albedo) for q in upper]
    return lower + upper


# ---------------------------------------------------------------- 2: airplanes

_PLANES = [
    # airliner: low swept wing, two underwing engines
    dict(fus=(2.0, .13), wing=(.05, -.06, 1.0, .34, 28, 6), stab=(.36, .18, 30), fin=(.36, .3, 40), engines=((.12, .4, -.16),)),
    # delta fighter, single fin
    dict(fus=(1.8, .1), delta=(-.2, .62, 1.1), fin=(.34, .42, 50), stab=None, nose_probe=True),
    # twin-boom
    dict(fus=(1.0, .12), wing=(0, 0, 1.05, .26, 0, 3), booms=True, prop=True),
    # high-wing monoplane with struts
    dict(fus=(1.5, .13), wing=(.15, .16, 1.15, .24, 0, 2), struts=True, stab=(.32, .16, 5), fin=(.26, .24, 30), prop=True, gear=True),
    # business jet: T-tail, rear engines
    dict(fus=(1.9, .11), wing=(.05, -.06, .8, .28, 30, 5), stab=(.3, .15, 30), fin=(.4, .28, 45), t_tail=True, rear_engines=True),
    # jumbo: four engines, hump
    dict(fus=(2.2, .16), wing=(0, -.08, 1.3, .42, 38, 6), stab=(.45, .2, 35), fin=(.45, .36, 45), engines=((.15, .42, -.2), (-.05, .8, -.18)), hump=True),
    # glider: long straight wing, T-tail, thin body
    dict(fus=(1.4, .07), wing=(.15, .06, 1.6, .14, 0, 4), stab=(.25, .1, 5), fin=(.25, .2, 25), t_tail=True),
    # biplane with propeller and fixed gear
    dict(fus=(1.4, .12), wing=(.3, -.1, 1.0, .28, 0, 2), biplane=.36, stab=(.3, .15, 0), fin=(.22, .22, 20), prop=True, gear=True),
    # canard delta, twin fins
    dict(fus=(1.8, .1), delta=(-.25, .6, 1.0), fin=(.3, .3, 45), twin_fins=True, canard=True, stab=None),
    # swept-wing fighter: wide short wing, twin fins, intakes
    dict(fus=(1.7, .11), wing=(-.15, 0, .55, .42, 45, -3), stab=(.3, .2, 40), fin=(.26, .26, 40), twin_fins=True, intakes=True),
]


def _airplane(p: dict) -> list[Part]:
    length, radius = p["fus"]
    tail_x = -length / 2 * .85
    parts = [ell((0, 0, 0), (length / 2, radius, radius)), ell((tail_x, 0, radius * .3), (length * .12, radius * .6, radius * .6))]
    if "wing" in p:
        x, z, span, chord, sweep, dihedral = p["wing"]
        parts += _pair(lambda s: wing((x, s * radius * .8, z), span, chord, sweep, dihedral, side=s))
        if p.get("biplane"):
            top = z + p["biplane"]
            parts += _pair(lambda s: wing((x + .05, s * .05, top), span, chord, sweep, dihedral, side=s))
            parts += [rod((x, s * f * span, z + .02), (x + .05, s * f * span, top), .015) for s in (1, -1) for f in (.35, .8)]
        if p.get("struts"):
            parts += _pair(lambda s: rod((x - .02, s * radius, -radius * .7), (x, s * span * .55, z), .015))
        for ex, ey, ez in p.get("engines", ()):
            parts += _pair(lambda s: ell((x + ex, s * ey, ez), (.16, .055, .055), albedo=.8))
    if "delta" in p:
        x, span, root_chord = p["delta"]
        trailing = x - root_chord / 2
        for k in range(3):  # a stepped delta: three strips, straight trailing edge, chord shrinking to the tip
            chord = root_chord * (1 - k / 3)
            y = radius * .5 + span * (k + .5) / 3
            parts += _pair(lambda s: plate((trailing + chord / 2, s * y, 0), (chord / 2, 0, 0), (0, span / 6, 0), .02))
    if p.get("stab") is not None:
        span, chord, sweep = p["stab"]
        z = radius * .3 + (p["fin"][1] if p.get("t_tail") else 0)
        parts += _pair(lambda s: wing((tail_x - .05, s * .04, z), span, chord, sweep, side=s, thick=.018))
    if "fin" in p:
        chord, height, sweep = p["fin"]
        if p.get("twin_fins"):
            parts += _pair(lambda s: fin((tail_x + .02, s * radius * .8, radius * .6), height, chord, sweep, tilt=s * 20))
        else:
            parts.append(fin((tail_x, 0, radius * .6), height, chord, sweep))
    if p.get("prop"):
        nose = length / 2
        parts += [ell((nose, 0, 0), (.06, .05, .05), albedo=.6), disc((nose + .03, 0, 0), (1, 0, 0), .26, .008, .85)]
    if p.get("gear"):
        parts += [rod((.35, s * .18, -.05), (.35, s * .22, -.3), .012) for s in (1, -1)]
        parts += [disc((.35, s * .22, -.32), (0, 1, 0), .06, .02, TYRE) for s in (1, -1)]
    if p.get("rear_engines"):
        parts += _pair(lambda s: ell((tail_x + .28, s * (radius + .08), radius * .6), (.17, .06, .06), albedo=.8))
    if p.get("hump"):
        parts.append(ell((length * .28, 0, radius * .75), (length * .18, radius * .7, radius * .6)))
    if p.get("booms"):
        for s in (1, -1):
            parts += [rod((.35, s * .38, 0), (-1.0, s * .38, 0), .05), fin((-.95, s * .38, .03), .3, .2, 30),
                      ell((.3, s * .38, 0), (.2, .07, .07)), disc((.5, s * .38, 0), (1, 0, 0), .18, .008, .85)]
        parts.append(plate((-1.0, 0, .05), (.09, 0, 0), (0, .42, 0), .015))
    if p.get("canard"):
        parts += _pair(lambda s: wing((length * .3, s * radius * .8, .02), .25, .13, 40, side=s, thick=.015))
    if p.get("intakes"):
        parts += _pair(lambda s: box((.15, s * (radius + .05), -.02), (.3, .05, .07)))
    if p.get("nose_probe"):
        parts.append(rod((length / 2 - .05, 0, 0), (length / 2 + .22, 0, 0), .012))
    return parts


# ---------------------------------------------------------------- 3: trucks


def _cab_over(x, w, h, z0=.2) -> list[Part]:
    return [box((x, 0, z0 + h / 2), (.22, w / 2, h / 2), lean=-.12), box((x + .2, 0, z0 + h * .55), (.03, w / 2 * .9, h * .3), albedo=.6)]


def _hooded_cab(x, w, h, z0=.2) -> list[Part]:
    """A conventional cab behind a hood; x is the front of the hood."""
    return [box((x - .2, 0, z0 + .17), (.2, w / 2 * .85, .17)), box((x - .58, 0, z0 + h / 2), (.18, w / 2, h / 2), lean=-.08)]


def _truck(i: int) -> list[Part]:
    w = .72
    if i == 0:  # box truck, cab-over
        return _cab_over(.8, w, .62) + [box((-.25, 0, .62), (.78, .4, .42)), box((0, 0, .18), (1.0, .3, .05))] + wheels((.78, -.55), .34, .17)
    if i == 1:  # semi: tractor and a long trailer
        return (_hooded_cab(1.45, w, .6) + [box((-.42, 0, .72), (.95, .38, .36)), box((.6, 0, .18), (.7, .3, .05))]
                + wheels((1.2, .65, .45), .34, .16) + wheels((-1.05, -1.25), .34, .16))
    if i == 2:  # tanker
        return (_hooded_cab(1.05, w, .6) + [rod((-1.0, 0, .55), (.3, 0, .55), .3), box((0, 0, .18), (1.0, .3, .05))]
                + [disc((x, 0, .55), (1, 0, 0), .31, .02, .7) for x in (-1.0, .3)] + wheels((.8, -.35, -.75), .34, .17))
    if i == 3:  # dump truck: big wheels, raised open bed
        rot, c = _rot_y(-18), _v((-.35, 0, .85))
        bed = [box(c + rot @ _v(o), h, rot) for o, h in (((0, 0, -.2), (.6, .42, .03)), ((0, .4, 0), (.6, .03, .2)),
                                                        ((0, -.4, 0), (.6, .03, .2)), ((.58, 0, 0), (.03, .42, .2)))]
        return _cab_over(.7, .76, .6, z0=.35) + bed + [box((0, 0, .36), (.9, .3, .06))] + wheels((.65, -.55), .36, .28, .1)
    if i == 4:  # lifted pickup: hood, cab, open bed, big tyres
        bed = [box((-.55, 0, .43), (.42, .36, .03)), box((-.55, .34, .55), (.42, .02, .12)), box((-.55, -.34, .55), (.42, .02, .12)),
               box((-.95, 0, .55), (.02, .36, .12)), box((0, 0, .34), (.95, .28, .05))]
        return _hooded_cab(.95, .72, .5, z0=.38) + bed + wheels((.65, -.65), .36, .24, .09)
    if i == 5:  # cement mixer: tilted drum
        return (_hooded_cab(1.05, w, .6) + [ell((-.4, 0, .75), (.6, .33, .33), _rot_y(-14)), box((0, 0, .18), (1.0, .3, .05)),
                                             rod((-1.0, 0, .9), (-.85, 0, .55), .05)] + wheels((.8, -.3, -.7), .34, .17))
    if i == 6:  # fire truck: long low body and a ladder
        rot = _rot_y(-6)
        return (_cab_over(1.05, w, .55) + [box((-.2, 0, .48), (.95, .37, .28)), box((-.2, 0, .9), (.85, .14, .035), rot, .8),
                                            disc((-.8, 0, .8), (0, 0, 1), .12, .05)] + wheels((.85, -.5, -.85), .34, .17))
    if i == 7:  # crane truck: boom raised over the cab
        rot = _rot_y(-32)
        return (_cab_over(.9, w, .55) + [box((-.2, 0, .28), (.9, .36, .06)), box((-.6, 0, .48), (.22, .3, .15)),
                                          box(_v((-.55, 0, .6)) + rot @ _v((.6, 0, 0)), (.65, .07, .07), rot, .8),
                                          rod((.0, 0, 1.1), (.05, 0, .6), .012)] + wheels((.8, -.35, -.75), .34, .17))
    if i == 8:  # flatbed with crates
        return (_cab_over(.85, w, .6) + [box((-.2, 0, .3), (.85, .38, .04)), box((-.55, .05, .5), (.28, .25, .18), albedo=.8),
                                          box((.1, -.1, .45), (.2, .2, .13), albedo=1.2), box((-.6, 0, .78), (.16, .16, .1), albedo=.8)]
                + wheels((.8, -.55), .34, .17))
    # 9: army truck: tall cab, canvas cover, three axles of big wheels
    return (_hooded_cab(1.0, .78, .55, z0=.32) + [box((-.45, 0, .58), (.6, .4, .2)), rod((-1.05, 0, .78), (.15, 0, .78), .38),
                                                   box((0, 0, .3), (1.0, .3, .05))] + wheels((.75, -.35, -.8), .37, .24, .09))


# ---------------------------------------------------------------- 4: cars


def _car(i: int) -> list[Part]:
    if i == 6:  # sedan
        return [box((0, 0, .3), (.9, .36, .14)), box((-.08, 0, .54), (.42, .33, .11), lean=-.9, albedo=.7)] + wheels((.55, -.55), .37, .14)
    if i == 1:  # hatchback: short, cabin to the rear
        return [box((0, 0, .3), (.68, .36, .14)), box((-.22, 0, .56), (.44, .34, .13), lean=-.6, albedo=.7)] + wheels((.42, -.42), .37, .14)
    if i == 2:  # SUV: tall, long cabin, big wheels
        return [box((0, 0, .42), (.85, .4, .2)), box((-.15, 0, .78), (.66, .38, .17), lean=-.35, albedo=.7)] + wheels((.55, -.55), .41, .2, .08)
    if i == 3:  # sports coupe: low rounded body, bubble cabin
        return [ell((0, 0, .25), (.95, .4, .14)), ell((-.12, 0, .36), (.38, .27, .13), albedo=.7)] + wheels((.55, -.55), .38, .13)
    if i == 4:  # minivan: one tall box, slanted front
        return [box((0, 0, .56), (.85, .39, .38), lean=-.25), box((.78, 0, .34), (.14, .37, .16))] + wheels((.5, -.55), .39, .14)
    if i == 5:  # beetle: dome on a low body, round fenders
        return ([ell((0, 0, .4), (.7, .35, .3)), box((0, 0, .26), (.72, .36, .1))] + [ell((x, s * .35, .26), (.2, .08, .13)) for x in (.42, -.42)
                for s in (1, -1)] + wheels((.42, -.42), .37, .13))
    if i == 0:  # convertible: no roof, windscreen, seats
        return ([box((0, 0, .3), (.9, .37, .13)), plate((.18, 0, .53), (-.04, 0, .1), (0, .33, 0), .01, .6)]
                + [box((-.15 - dx, s * .15, .5), (.08, .11, .1), albedo=.6) for dx in (0, .35) for s in (1, -1)] + wheels((.55, -.55), .37, .14))
    if i == 7:  # limousine
        return [box((0, 0, .3), (1.25, .37, .14)), box((-.1, 0, .53), (.8, .33, .1), lean=-.6, albedo=.7)] + wheels((.8, -.85), .37, .14)
    if i == 8:  # station wagon: long roof to the tail, roof rails
        return ([box((0, 0, .3), (.95, .37, .14)), box((-.25, 0, .58), (.7, .35, .15), lean=-.2, albedo=.7)]
                + [box((-.3, s * .28, .75), (.55, .02, .015)) for s in (1, -1)] + wheels((.58, -.6), .37, .14))
    # 9: jeep: boxy, no roof, roll bar, spare wheel on the back
    return ([box((0, 0, .42), (.7, .38, .18)), box((.55, 0, .64), (.02, .36, .1), albedo=.6), disc((-.74, 0, .45), (1, 0, 0), .17, .05, TYRE)]
            + [rod((-.3, s * .33, .6), (-.3, s * .33, .9), .025) for s in (1, -1)] + [rod((-.3, .33, .9), (-.3, -.33, .9), .025)]
            + wheels((.48, -.48), .4, .2, .08))


# ---------------------------------------------------------------- normalised toys


def _surface_points(part: Part) -> np.ndarray:
    """Points on the part's surface (for its extent), (n, 3)."""
    if part.kind == ELLIPSOID:
        k = np.arange(64) + 0.5
        phi, cos_t = k * np.pi * (3 - np.sqrt(5)), 1 - 2 * k / 64
        sin_t = np.sqrt(1 - cos_t**2)
        unit = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], 1)
    elif part.kind == BOX:
        unit = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
    else:
        a = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        unit = np.concatenate([np.stack([np.cos(a), np.sin(a), np.full_like(a, z)], 1) for z in (-1, 1)])
    return part.center + unit @ part.matrix.T


@lru_cache(maxsize=None)
def toy(category: int, instance: int) -> tuple[Part, ...]:
    """The toy's parts, centred on its bounding box and scaled to unit radius."""
    if category == 0:
        parts = _animal(_ANIMALS[instance])
    elif category == 1:
        parts = _human(_HUMANS[instance])
    elif category == 2:
        parts = _airplane(_PLANES[instance])
    elif category == 3:
        parts = _truck(instance)
    else:
        parts = _car(instance)
    points = np.concatenate([_surface_points(p) for p in parts])
    centre = (points.min(0) + points.max(0)) / 2
    scale = 1.0 / np.linalg.norm(points - centre, axis=1).max()
    return tuple(Part(p.kind, ((p.center - centre) * scale).astype(np.float32), (p.matrix * scale).astype(np.float32), p.albedo)
                 for p in parts)


def paint(category: int, instance: int) -> float:
    """The toy's base albedo: fixed per toy, from 0.6 to 1.0."""
    return float(np.random.default_rng([category, instance, 7]).uniform(0.6, 1.0))
