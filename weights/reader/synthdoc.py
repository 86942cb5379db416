"""Synthetic document pages with their ground truth, for training and testing the small reader.

A page is a few lines of English words, sentences, numbers, dates, prices and codes, rendered in one of
Debian's DejaVu fonts at a random size, colour and position, then slightly rotated, blurred, noised and
JPEG-compressed. `page(seed)` is a pure function of its seed (Python's `random` and NumPy seeded from it),
so a split is a seed range: training uses seeds below `HELDOUT_BASE`, evaluation seeds from it on.

The ground truth is what DeepSeek-OCR's `Free OCR.` prompt answers: the lines, top to bottom, joined by
"\\n", without layout markup.
"""

from __future__ import annotations

import datetime
import io
import pathlib
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HELDOUT_BASE = 1_000_000_000
FONT_DIR = pathlib.Path("/usr/share/fonts/truetype/dejavu")
FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerifCondensed.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
]

# Common English words (a frequency list's head, written out: no dictionary is installed here).
WORDS = """
the of and to in is was for on that with as by at from his it an were are which this be or has had not
first one their its new after but who they two her been other when there all during into school time may
years more most only over city some world would where later up such used many can state about national
out known university united then made also part year three century people under work north south east west
team found born old before well being life high since any now government member each between second group
film both school name like game long end series great first area local book water history home family city
day house light world small large early late open public total order number report price market value
service system office data page line note point room river road street town park garden church market plan
study table chart figure section chapter letter paper article story music song art field power energy health
food money bank card account client customer product item order invoice receipt payment balance amount
date week month morning evening night today tomorrow yesterday spring summer autumn winter january february
march april june july august september october november december monday tuesday wednesday thursday friday
saturday sunday red blue green black white yellow brown gray dark bright clear quiet fast slow warm cold
hot deep short tall wide simple strong free full final main best good better real true left right top
bottom front back center inside outside above below near far here every another same different few
several much little very still even just again always never often soon together around through without
against among across along toward within upon read write send keep take give make find show tell call ask
move turn start stop help learn build run play look come go see know think feel want need use try leave
meet bring hold stand sit walk speak pay buy sell grow change follow create offer serve allow add begin
close cover carry check drive enter explain finish happen improve include join lead measure notice open
prepare produce provide reach receive record reduce remain repeat return select share sign support test
train travel visit wait watch wish answer
""".split()
WORDS = sorted(set(WORDS))
STREETS = ["Main", "Oak", "Pine", "Maple", "Cedar", "Elm", "Lake", "Hill", "Park", "River", "Church", "Mill"]
LABELS = ["Total", "Subtotal", "Tax", "Date", "Invoice", "Order", "Account", "Phone", "Room", "Ref",
          "Amount", "Balance", "Due", "Item", "Price", "Qty", "Page", "Code", "Time", "Score"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def sentence(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    words[0] = words[0].capitalize()
    text = " ".join(words)
    return text + rng.choice([".", ".", ".", "", ",", ":", "?", "!"])


def number(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randint(0, 9999))
    if kind == 1:
        return f"{rng.randint(0, 99999):,}"
    if kind == 2:
        return f"{rng.randint(0, 9999)}.{rng.randint(0, 99):02d}"
    if kind == 3:
        return f"${rng.randint(1, 9999):,}.{rng.randint(0, 99):02d}"
    if kind == 4:
        return f"{rng.randint(0, 100)}%"
    return f"{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"


def date(rng: random.Random) -> str:
    d = datetime.date(1990, 1, 1) + datetime.timedelta(days=rng.randrange(40 * 365))
    kind = rng.randrange(4)
    if kind == 0:
        return d.isoformat()
    if kind == 1:
        return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"
    if kind == 2:
        return f"{d.month:02d}/{d.day:02d}/{d.year}"
    return f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}"


def line(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return sentence(rng, 2, 5)
    if kind < 0.65:
        return f"{rng.choice(LABELS)}: {number(rng)}"
    if kind < 0.78:
        return f"{rng.choice(LABELS)} {date(rng)}"
    if kind < 0.88:
        return f"{rng.randint(1, 999)} {rng.choice(STREETS)} Street"
    if kind < 0.94:
        return rng.choice(WORDS).capitalize() + " " + rng.choice(WORDS)
    return f"{sentence(rng, 2, 4)[:-1]} {number(rng)}"


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / name), size)


def vocabulary_texts(seed: int, count: int) -> list[str]:
    """`count` lines drawn like a page's, each with all its word prefixes (what fitting a line to the page
    leaves): the texts whose token ids make up the reader's vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = line(rng).split(" ")
        out += [" ".join(words[:k]) for k in range(1, len(words) + 1)]
        out.append(easy_line(rng))
    return out


def easy_line(rng: random.Random) -> str:
    """A warm-up line the language prior cannot guess: one or two random words or a number."""
    kind = rng.random()
    if kind < 0.5:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2)))
    if kind < 0.65:
        return rng.choice(WORDS).capitalize()
    if kind < 0.9:
        return number(rng)
    return date(rng)


def page(seed: int, easy: bool = False) -> tuple[Image.Image, str]:
    """One synthetic page (RGB) and its `Free OCR.` ground truth. `easy`: the warm-up curriculum's
    pages (one or two short lines in a large font); evaluation pages are never easy."""
    img, text, _ = page_with_layout(seed, easy)
    return img, text


def page_with_layout(seed: int, easy: bool = False) -> tuple[Image.Image, str, list[tuple[int, float, float]]]:
    """`page` and where each visible character of the ground truth lies: (index in the text, x, y)
    of its centre as fractions of the page's width and height, after the rotation (what the
    training's alignment targets are made of; spaces and newlines have none)."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    width, height = rng.randint(448, 640), rng.randint(384, 600)
    # Glyph size chosen in the 512×512 frame the Tiny mode stretches the page to.
    size_512 = rng.randint(40, 56) if easy else rng.randint(30, 42)
    size = max(10, round(size_512 * width / 512))
    font = _font(rng.choice(FONTS), size)
    bg = tuple(rng.randint(215, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    margin = rng.randint(8, 40)
    spacing = rng.uniform(1.25, 1.7) * size
    y = rng.randint(8, 40)
    lines: list[str] = []
    centres: list[tuple[int, float, float]] = []
    for _ in range(rng.randint(1, 2) if easy else rng.randint(1, 4)):
        if y + size > height - 8:
            break
        text = easy_line(rng) if easy else line(rng)
        # Drop words from the end until the line fits.
        room = width - margin - 8
        while (length := draw.textlength(text, font=font)) > room and " " in text:
            text = text.rsplit(" ", 1)[0]
        if length > room:
            continue
        x = margin + rng.randint(0, max(0, int(room - length) // 3))
        draw.text((x, y), text, font=font, fill=fg)
        top, bottom = draw.textbbox((x, y), text, font=font)[1::2]
        start = sum(len(t) + 1 for t in lines)
        for i, ch in enumerate(text):
            if not ch.isspace():
                mid = x + (draw.textlength(text[:i], font=font) + draw.textlength(text[: i + 1], font=font)) / 2
                centres.append((start + i, mid, (top + bottom) / 2))
        lines.append(text)
        y += spacing
    if rng.random() < 0.5:
        angle = rng.uniform(-1.5, 1.5)
        img = img.rotate(angle, resample=Image.BICUBIC, fillcolor=bg)
        # PIL turns the picture counter-clockwise about its centre.
        t, cx, cy = np.radians(angle), width / 2, height / 2
        centres = [(i, cx + (px - cx) * np.cos(t) + (py - cy) * np.sin(t),
                    cy - (px - cx) * np.sin(t) + (py - cy) * np.cos(t)) for i, px, py in centres]
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    if rng.random() < 0.5:
        arr = np.asarray(img).astype(np.float32)
        arr += nprng.normal(0.0, rng.uniform(2.0, 10.0), arr.shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.4:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(35, 90))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img, "\n".join(lines), [(i, float(px) / width, float(py) / height) for i, px, py in centres]


if __name__ == "__main__":
    import sys

    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/synth")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        im, gt = page(HELDOUT_BASE + i)
        im.save(out / f"{i}.png")
        (out / f"{i}.txt").write_text(gt)
        print(i, repr(gt))
