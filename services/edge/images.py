"""Images for vision models, shrunk at the edge before a request is queued (`LLMBUS_IMAGE_*`).

A phone photo is megabytes of base64 the bus, the stream and the model server all carry, while a
vision model sees a few hundred pixels a side. With `LLMBUS_IMAGE_MAX_SIDE` the longest side is
bounded (aspect kept); with `LLMBUS_IMAGE_QUALITY` every image is re-encoded as JPEG at that
quality (alpha flattened on white). EXIF orientation is applied first, since re-encoding drops it.
A resized image always replaces the original (the bound holds; a PNG stays PNG when that is
smaller); one only re-encoded replaces it when smaller, so an image never grows for nothing. `Pipeline.serve`
calls `shrink` for every API's request; the work runs in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io

import msgspec
from PIL import Image, ImageOps, UnidentifiedImageError

from contracts import ErrorCode, GenerateRequest, LlmbusError
from services.runtime.settings import Settings

_LOSSLESS = ("PNG", "WEBP", "GIF")  # kept in their format when only resized; anything else: JPEG
_PILLOW_FAILURES = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


class Shrunk(msgspec.Struct):
    """What shrinking did to one request's images (the shared dialect reports the bytes saved)."""

    images: int = 0
    saved_bytes: int = 0  # decoded bytes before minus after


class ImagePolicy(msgspec.Struct, frozen=True):
    max_side: int = 0
    quality: int = 0

    @classmethod
    def of(cls, settings: Settings) -> ImagePolicy | None:
        if settings.image_max_side < 0 or not 0 <= settings.image_quality <= 95:
            raise ValueError("LLMBUS_IMAGE_MAX_SIDE must be >= 0 and LLMBUS_IMAGE_QUALITY 0 to 95")
        if not settings.image_max_side and not settings.image_quality:
            return None
        return cls(settings.image_max_side, settings.image_quality)

    def image(self, data: bytes, where: str) -> bytes:
        """One image's bytes, shrunk (or the same bytes when that would not make them smaller)."""
        try:
            img: Image.Image = Image.open(io.BytesIO(data))  # reads the header only
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:  # a decompression bomb: never decoded
                raise LlmbusError(ErrorCode.BAD_REQUEST, f"{where}: the image has too many pixels")
            fmt = img.format or "PNG"
            if self.max_side and fmt == "JPEG":
                img.draft("RGB", (self.max_side, self.max_side))  # decode at a fraction of the size
            img = ImageOps.exif_transpose(img)
            resized = bool(self.max_side) and max(img.size) > self.max_side
            if resized:
                img.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
            if not resized and not self.quality:
                return data
            candidates: list[bytes] = []
            if self.quality or fmt not in _LOSSLESS:
                candidates.append(_encoded(_flat(img), "JPEG", quality=self.quality or 85, optimize=True))
            if resized and fmt in _LOSSLESS:  # a screenshot's PNG may beat its JPEG
                candidates.append(_encoded(img, fmt))
        except Image.DecompressionBombWarning:  # Pillow's own check, where warnings are errors
            raise LlmbusError(ErrorCode.BAD_REQUEST, f"{where}: the image has too many pixels") from None
        except _PILLOW_FAILURES as exc:
            raise LlmbusError(ErrorCode.BAD_REQUEST, f"{where}: not a readable image ({exc})") from None
        best = min(candidates, key=len)
        return best if resized or len(best) < len(data) else data  # the bound holds; else never grow


def _encoded(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def _flat(img: Image.Image) -> Image.Image:
    """RGB for JPEG: transparency over white (a vision model reads it as a page would show it)."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, "white")
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img.convert("RGB")


def _one(policy: ImagePolicy, image: str, where: str, tally: Shrunk) -> str:
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"{where}: an image is not valid base64") from None
    shrunk = policy.image(data, where)
    tally.images += 1
    if shrunk is data:
        return image
    tally.saved_bytes += len(data) - len(shrunk)
    return base64.b64encode(shrunk).decode()


def _shrink(policy: ImagePolicy, request: GenerateRequest, tally: Shrunk) -> GenerateRequest:
    changes: dict[str, object] = {}
    if request.images:
        changes["images"] = [_one(policy, im, f"images[{i}]", tally) for i, im in enumerate(request.images)]
    if request.messages and any(m.images for m in request.messages):
        changes["messages"] = [
            m
            if not m.images
            else msgspec.structs.replace(
                m,
                images=[
                    _one(policy, im, f"messages[{n}].images[{i}]", tally) for i, im in enumerate(m.images)
                ],
            )
            for n, m in enumerate(request.messages)
        ]
    return msgspec.structs.replace(request, **changes) if changes else request


async def shrink(settings: Settings, request: GenerateRequest) -> tuple[GenerateRequest, Shrunk]:
    """`request` with its images shrunk per the settings (the same request when there is nothing to do)."""
    policy = ImagePolicy.of(settings)
    tally = Shrunk()
    if policy is None or not (request.images or any(m.images for m in request.messages or ())):
        return request, tally
    return await asyncio.to_thread(_shrink, policy, request, tally), tally
