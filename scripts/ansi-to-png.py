#!/usr/bin/python3
"""Renders a terminal capture with colours (`tmux capture-pane -e -p`) as a PNG.

Usage: scripts/ansi-to-png.py CAPTURE.ansi OUT.png [COLUMNS]

Needs python3-pil and fonts-dejavu-core (Debian). Understands the SGR
sequences tmux emits: reset, bold, dim, italic, underline, reverse, the 16
basic colours, 256-colour and 24-bit colours.
"""

import re
import sys

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"
SIZE = 15
FG, BG = (220, 220, 220), (24, 24, 28)
BASIC = [
    (0, 0, 0), (205, 49, 49), (13, 188, 121), (229, 229, 16),
    (36, 114, 200), (188, 63, 188), (17, 168, 205), (229, 229, 229),
    (102, 102, 102), (241, 76, 76), (35, 209, 139), (245, 245, 67),
    (59, 142, 234), (214, 112, 214), (41, 184, 219), (255, 255, 255),
]
# Box-drawing characters: which of their left, right, up, down arms exist.
BOX = {
    "─": (1, 1, 0, 0), "│": (0, 0, 1, 1), "┌": (0, 1, 0, 1), "┐": (1, 0, 0, 1),
    "└": (0, 1, 1, 0), "┘": (1, 0, 1, 0), "├": (0, 1, 1, 1), "┤": (1, 0, 1, 1),
    "┬": (1, 1, 0, 1), "┴": (1, 1, 1, 0), "┼": (1, 1, 1, 1),
}


def color256(n):
    if n < 16:
        return BASIC[n]
    if n < 232:
        n -= 16
        steps = [0, 95, 135, 175, 215, 255]
        return (steps[n // 36], steps[n // 6 % 6], steps[n % 6])
    v = 8 + (n - 232) * 10
    return (v, v, v)


def parse(text):
    """Yields rows of (char, style) cells."""
    style = {}
    rows = []
    for line in text.split("\n"):
        row = []
        pos = 0
        for m in re.finditer(r"\x1b\[([0-9;]*)m", line):
            row.extend((c, dict(style)) for c in line[pos:m.start()])
            pos = m.end()
            codes = [int(c) if c else 0 for c in m.group(1).split(";")]
            i = 0
            while i < len(codes):
                c = codes[i]
                if c == 0:
                    style = {}
                elif c == 1:
                    style["bold"] = True
                elif c == 2:
                    style["dim"] = True
                elif c == 4:
                    style["underline"] = True
                elif c == 7:
                    style["reverse"] = True
                elif c in (22,):
                    style.pop("bold", None)
                    style.pop("dim", None)
                elif c == 24:
                    style.pop("underline", None)
                elif c == 27:
                    style.pop("reverse", None)
                elif 30 <= c <= 37:
                    style["fg"] = BASIC[c - 30]
                elif 90 <= c <= 97:
                    style["fg"] = BASIC[c - 90 + 8]
                elif 40 <= c <= 47:
                    style["bg"] = BASIC[c - 40]
                elif 100 <= c <= 107:
                    style["bg"] = BASIC[c - 100 + 8]
                elif c == 39:
                    style.pop("fg", None)
                elif c == 49:
                    style.pop("bg", None)
                elif c in (38, 48) and i + 1 < len(codes):
                    key = "fg" if c == 38 else "bg"
                    if codes[i + 1] == 5 and i + 2 < len(codes):
                        style[key] = color256(codes[i + 2])
                        i += 2
                    elif codes[i + 1] == 2 and i + 4 < len(codes):
                        style[key] = tuple(codes[i + 2:i + 5])
                        i += 4
                i += 1
        row.extend((c, dict(style)) for c in line[pos:])
        rows.append(row)
    while rows and not any(c.strip() for c, _ in rows[-1]):
        rows.pop()
    return rows


def main():
    src, out = sys.argv[1], sys.argv[2]
    with open(src, encoding="utf-8") as f:
        rows = parse(f.read())
    cols = int(sys.argv[3]) if len(sys.argv) > 3 else max(len(r) for r in rows)
    font = ImageFont.truetype(FONT, SIZE)
    bold = ImageFont.truetype(BOLD, SIZE)
    cw = round(font.getlength("M"))
    ch = SIZE + 4
    pad = 10
    img = Image.new("RGB", (cols * cw + 2 * pad, len(rows) * ch + 2 * pad), BG)
    d = ImageDraw.Draw(img)
    for y, row in enumerate(rows):
        for x, (c, st) in enumerate(row):
            fg, bg = st.get("fg", FG), st.get("bg", BG)
            if st.get("reverse"):
                fg, bg = bg, fg
            if st.get("dim"):
                fg = tuple(v * 6 // 10 for v in fg)
            px, py = pad + x * cw, pad + y * ch
            if bg != BG:
                d.rectangle([px, py, px + cw - 1, py + ch - 1], fill=bg)
            if c in BOX:
                # Drawn as 2-pixel strokes: font glyphs are 1 pixel thin and
                # vanish when the picture is shown scaled down.
                mx, my = px + cw // 2, py + ch // 2
                left, right, up, down = BOX[c]
                if left or right:
                    d.line([px if left else mx, my, px + cw if right else mx, my], fill=fg, width=2)
                if up or down:
                    d.line([mx, py if up else my, mx, py + ch if down else my], fill=fg, width=2)
            elif c != " ":
                d.text((px, py + 1), c, font=bold if st.get("bold") else font, fill=fg)
            if st.get("underline"):
                d.line([px, py + ch - 2, px + cw - 1, py + ch - 2], fill=fg)
    img.save(out)


if __name__ == "__main__":
    main()
