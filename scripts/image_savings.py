"""Bytes `LLMBUS_IMAGE_MAX_SIDE` / `LLMBUS_IMAGE_QUALITY` save on real-sized images (docs/operations.md).

    python -m scripts.image_savings

The images are made here with Pillow, deterministic (seeded noise): a 12 MP phone photo (JPEG q92),
a full-HD screenshot (PNG), a 6 MP scanned page with an alpha channel (PNG) and a 1 MP JPEG that
is already small. Each is shrunk as the edge does (services/edge/images.py) under three policies.
"""

from __future__ import annotations

import io
import time

from PIL import Image, ImageDraw, ImageFilter

from services.edge.images import ImagePolicy

POLICIES = {
    "max_side=1024": ImagePolicy(max_side=1024),
    "quality=80": ImagePolicy(quality=80),
    "max_side=1024,quality=80": ImagePolicy(max_side=1024, quality=80),
}


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with sensor-like noise: what makes a photo's JPEG large."""
    base = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 40).filter(ImageFilter.GaussianBlur(0.6))
    red = Image.blend(base, noise, 0.35)
    green = Image.blend(base.rotate(90, expand=False), noise, 0.3)
    blue = Image.effect_noise((width, height), 25 + seed)
    return Image.merge("RGB", (red, green, blue))


def screenshot(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for row in range(0, height, 18):
        for col in range(40, width - 200, 90):
            draw.text((col, row), "llmbus queue", fill=(30 + row % 90, 30, 60))
    draw.rectangle((0, 0, width, 48), fill=(40, 90, 160))
    return img


def page(width: int, height: int) -> Image.Image:
    img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    for row in range(60, height - 60, 22):
        draw.line((80, row, width - 80 - (row * 7) % 400, row), fill=(20, 20, 20, 255), width=3)
    return img


def encoded(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def main() -> None:
    images = {
        "photo 4032x3024 JPEG q92": encoded(photo(4032, 3024, 1), "JPEG", quality=92),
        "screenshot 1920x1080 PNG": encoded(screenshot(1920, 1080), "PNG"),
        "page 2480x3508 RGBA PNG": encoded(page(2480, 3508), "PNG"),
        "photo 1024x768 JPEG q85": encoded(photo(1024, 768, 2), "JPEG", quality=85),
    }
    print(f"{'image':28} {'bytes':>10} " + " ".join(f"{name:>28}" for name in POLICIES))
    totals = dict.fromkeys(POLICIES, 0)
    for name, data in images.items():
        cells = []
        for policy_name, policy in POLICIES.items():
            start = time.perf_counter()
            shrunk = policy.image(data, name)
            ms = (time.perf_counter() - start) * 1000
            totals[policy_name] += len(data) - len(shrunk)
            cells.append(f"{len(shrunk):>9} (-{1 - len(shrunk) / len(data):4.0%}, {ms:4.0f} ms)")
        print(f"{name:28} {len(data):>10} " + " ".join(f"{cell:>28}" for cell in cells))
    total = sum(len(data) for data in images.values())
    saved = " ".join(f"{f'-{totals[p]} ({totals[p] / total:.0%})':>28}" for p in POLICIES)
    print(f"{'saved of ' + str(total):39} {saved}")


if __name__ == "__main__":
    main()
