"""Make the bundled example segment, ``example_zarr/example.zarr``, reproducibly.

A synthetic flattened surface volume shaped like the real ones: 65 uint16
layers ``00.tif ... 64.tif`` with the surface at layer 32, papyrus with two
crossed fibre layers and noise, black outside the papyrus mask, and the Greek
word ΠΟΡΦΥΡΑΣ ("purple", the first word read in a Herculaneum scroll) written
in ink: a subtle density increase in the layers around the surface. Beside the
layers, ``inklabels.png`` (anti-aliased 0-255) and ``mask.png``.

It writes those files into a temporary folder and runs ``converter.py`` on
them, as a user would:

    python example_zarr/make_example.py            # rewrites example_zarr/example.zarr
    python example_zarr/make_example.py other.zarr # or writes it elsewhere

Needs numpy, tifffile, zarr and Pillow.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
import tifffile
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS, HEIGHT, WIDTH = 65, 192, 512
SURFACE = 32
WORD = "ΠΟΡΦΥΡΑΣ"
# Strokes of each letter as polylines in a unit box (x right, y down);
# a 4-tuple in a list is an ellipse's bounding box.
STROKES = {
    "Π": [[(0, 1), (0, 0), (1, 0), (1, 1)]],
    "Ο": [(0, 0, 1, 1)],
    "Ρ": [[(0, 1), (0, 0), (0.7, 0), (0.95, 0.15), (0.95, 0.35), (0.7, 0.5), (0, 0.5)]],
    "Φ": [(0, 0.2, 1, 0.75), [(0.5, 0), (0.5, 1)]],
    "Υ": [[(0, 0), (0.5, 0.5), (1, 0)], [(0.5, 0.5), (0.5, 1)]],
    "Α": [[(0, 1), (0.5, 0), (1, 1)], [(0.22, 0.6), (0.78, 0.6)]],
    "Σ": [[(1, 0), (0, 0), (0.5, 0.5), (0, 1), (1, 1)]],
}


def ink_labels(scale=4):
    """The word as an anti-aliased 8-bit label image (drawn at ``scale``x, averaged)."""
    image = Image.new("L", (WIDTH * scale, HEIGHT * scale), 0)
    draw = ImageDraw.Draw(image)
    size, gap = 38 * scale, 12 * scale
    top = (HEIGHT * scale - size) // 2
    left = (WIDTH * scale - len(WORD) * size - (len(WORD) - 1) * gap) // 2
    width = 7 * scale
    for i, letter in enumerate(WORD):
        x0 = left + i * (size + gap)
        for stroke in STROKES[letter]:
            if isinstance(stroke, tuple):
                box = [x0 + stroke[0] * size, top + stroke[1] * size,
                       x0 + stroke[2] * size, top + stroke[3] * size]
                draw.ellipse(box, outline=255, width=width)
            else:
                points = [(x0 + px * size, top + py * size) for px, py in stroke]
                draw.line(points, fill=255, width=width, joint="curve")
    big = np.asarray(image, dtype=np.float32)
    small = big.reshape(HEIGHT, scale, WIDTH, scale).mean(axis=(1, 3))
    return np.rint(small).astype(np.uint8)


def papyrus_mask(rng):
    """A fragment's outline: an ellipse with a ragged edge."""
    y, x = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
    angle = np.arctan2((y - HEIGHT / 2) / HEIGHT, (x - WIDTH / 2) / WIDTH)
    phases = rng.uniform(0, 2 * np.pi, 4)
    ragged = 1 + sum(a * np.sin(k * angle + p)
                     for a, k, p in zip((0.05, 0.03, 0.015, 0.01), (2, 5, 11, 23), phases))
    radius = np.hypot((y - HEIGHT / 2) / (0.49 * HEIGHT), (x - WIDTH / 2) / (0.49 * WIDTH))
    return (radius < ragged).astype(np.uint8) * 255


def layers(labels, mask, rng):
    """The 65 uint16 layers: papyrus density by depth, fibres, ink, noise."""
    y, x = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
    # The sheet is not perfectly flat: its surface wanders by a layer or two,
    # over a few letters' width, so that every part of the segment (a held-out
    # band too) shows the whole range of surface heights.
    surface = SURFACE + 1.5 * np.sin(x / 23) * np.cos(y / 31)
    horizontal = 0.5 + 0.5 * np.sin(y / 2.3 + 2 * np.sin(x / 40))    # recto fibres
    vertical = 0.5 + 0.5 * np.sin(x / 2.1 + 2 * np.sin(y / 35))      # verso fibres
    ink = labels.astype(np.float32) / 255
    inside = mask > 0
    for z in range(LAYERS):
        depth = z - surface                     # < 0 above the surface, > 0 inside
        density = 1 / (1 + np.exp(-depth / 1.5)) * np.exp(-np.clip(depth, 0, None) / 14)
        fibres = np.where(depth < 7, horizontal, vertical)
        value = 6000 + density * (26000 + 7000 * fibres)
        # Ink: a little denser than papyrus, in the few layers at the surface.
        value += 3000 * ink * np.exp(-(depth / 2.0) ** 2)
        value += rng.normal(0, 1800, value.shape)
        value = np.clip(value, 0, 65535).astype(np.uint16) & 0xFFF0   # 12-bit detector
        yield np.where(inside, value, 0).astype(np.uint16)


def main(dest=os.path.join(HERE, "example.zarr")):
    dest = os.path.abspath(dest)
    rng = np.random.default_rng(2023)
    labels = ink_labels()
    mask = papyrus_mask(rng)
    labels[mask == 0] = 0
    with tempfile.TemporaryDirectory() as folder:
        layers_dir = os.path.join(folder, "layers")
        os.makedirs(layers_dir)
        for z, layer in enumerate(layers(labels, mask, rng)):
            tifffile.imwrite(os.path.join(layers_dir, f"{z:02d}.tif"), layer)
        Image.fromarray(labels).save(os.path.join(folder, "inklabels.png"))
        Image.fromarray(mask).save(os.path.join(folder, "mask.png"))
        # Relative paths, run from the folder: the attributes of the store
        # record them, and no path of this machine.
        subprocess.run(
            [sys.executable, os.path.join(HERE, "..", "converter.py"), "layers",
             dest, "--labels", "inklabels.png",
             "--mask", "mask.png", "--overwrite", "--quiet"], cwd=folder, check=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
