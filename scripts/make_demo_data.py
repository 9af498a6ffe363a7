"""Write a small, learnable ImageNet-layout dataset of real JPEG files for the CPU demo and tests.

    python scripts/make_demo_data.py --out demo_out/data --classes 6 --train-per-class 100 \
        --val-per-class 40 --seed 0

Each class is a shape (circle, square, triangle, cross, ...) in its own hue (jittered), at a random
position, size and rotation on a noisy background crossed by distractor lines, so a network has to find
the object: what LIP's importance maps should highlight. Objects are large enough that RandomResizedCrop
usually keeps part of them.
Layout: OUT/train/<class>/<n>.JPEG and OUT/val/<class>/<n>.JPEG; the same seed gives the same files.
"""

from __future__ import annotations

import argparse
import colorsys
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")


def polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a regular-ish shape of radius r around (cx, cy), rotated by `angle`."""
    if kind == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif kind == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif kind == "diamond":
        pts = [(0.6 * r, 0), (0, r), (-0.6 * r, 0), (0, -r)]
    elif kind == "bar":
        pts = [(r, 0.3 * r), (-r, 0.3 * r), (-r, -0.3 * r), (r, -0.3 * r)]
    elif kind == "star":
        pts = [((r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5 - math.pi / 2),
                (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5 - math.pi / 2)) for k in range(10)]
    else:  # cross
        t = 0.33 * r
        pts = [(t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t), (-t, -r), (t, -r), (t, -t), (r, -t),
               (r, t), (t, t)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def draw_sample(cls: int, num_classes: int, size: int, rng: random.Random) -> Image.Image:
    """One image of class `cls`: its shape in its (jittered) hue on a random textured background."""
    noise = Image.effect_noise((size, size), rng.uniform(20, 60)).convert("RGB")
    tint = Image.new("RGB", (size, size), tuple(rng.randint(60, 190) for _ in range(3)))
    img = Image.blend(noise, tint, rng.uniform(0.4, 0.7))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):  # distractor lines in random colours
        pts = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)]
        draw.line(pts, fill=tuple(rng.randint(0, 255) for _ in range(3)), width=rng.randint(1, 3))

    hue = (cls / num_classes + rng.uniform(-0.05, 0.05)) % 1.0
    colour = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)))
    kind = SHAPES[cls % len(SHAPES)]
    r = size * rng.uniform(0.2, 0.32)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(r * 0.35)))
    else:
        draw.polygon(polygon(kind, cx, cy, r, angle), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="dataset root to write")
    parser.add_argument("--classes", type=int, default=6, help=f"number of classes (at most {len(SHAPES)})")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=80, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 2 <= args.classes <= len(SHAPES):
        sys.exit(f"error: --classes must be between 2 and {len(SHAPES)}")
    if args.train_per_class < 1 or args.val_per_class < 1 or args.size < 16:
        sys.exit("error: --train-per-class and --val-per-class must be >= 1 and --size >= 16")

    for split, per_class in (("train", args.train_per_class), ("val", args.val_per_class)):
        for cls in range(args.classes):
            folder = args.out / split / f"{cls:02d}_{SHAPES[cls]}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                rng = random.Random(f"{args.seed}:{split}:{cls}:{n}")
                draw_sample(cls, args.classes, args.size, rng).save(folder / f"{n:05d}.JPEG", quality=90)
    total = args.classes * (args.train_per_class + args.val_per_class)
    print(f"wrote {total} JPEG files ({args.classes} classes) to {args.out}")


if __name__ == "__main__":
    main()
