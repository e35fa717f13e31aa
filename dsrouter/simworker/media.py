"""Real, decodable bytes for everything the simulated worker hands out.

Clients of the router (the `openai` package, image viewers, our tests) read the answers, so
images are genuine PNG or baseline JPEG files of the requested size, videos start with real
MP4 boxes, and rollout tensors are genuine safetensors blobs. Nothing here needs numpy or
Pillow: the JPEG encoder writes only each 8x8 block's DC coefficient (a flat colour per
block), which keeps it small and fast enough in pure Python while staying a valid baseline
JPEG that every decoder accepts.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from collections.abc import Iterator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


def image_format(output_format: str | None, background: str | None) -> str:
    """The worker's rule: an explicit format wins, else PNG for transparency, else JPEG.

    WebP is answered with PNG bytes: the simulator has no WebP encoder, and clients
    that check the format read the magic bytes, not our promise.
    """
    if output_format in ("png", "webp"):
        return "png"
    if output_format in ("jpeg", "jpg"):
        return "jpeg"
    return "png" if background == "transparent" else "jpeg"


def encode_image(width: int, height: int, fmt: str, seed: int) -> bytes:
    return encode_png(width, height, seed) if fmt == "png" else encode_jpeg(width, height, seed)


# ---- PNG -------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(width: int, height: int, seed: int) -> bytes:
    """An RGB gradient with low-order noise, so sizes resemble a photo's, not a flat fill.

    Rows are built with `bytes.translate` from eight noisy base rows, which keeps a
    2048x2048 image in the tens of milliseconds without numpy.
    """
    rng = random.Random(seed)
    gradient = [x * 224 // max(width - 1, 1) for x in range(width) for _ in range(3)]
    bases = [
        bytes(g | (n & 0x1F) for g, n in zip(gradient, rng.randbytes(width * 3), strict=True))
        for _ in range(8)
    ]
    shifts: dict[int, bytes] = {}
    rows = []
    for y in range(height):
        shade = (y * 255 // max(height - 1, 1) + seed) & 0xFF
        table = shifts.get(shade)
        if table is None:
            table = shifts[shade] = bytes((v + shade) & 0xFF for v in range(256))
        rows.append(b"\x00" + bases[y % 8].translate(table))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"".join(rows), 1))
        + _chunk(b"IEND", b"")
    )


# ---- baseline JPEG, DC coefficients only -------------------------------------------------

# One Huffman table for DC differences: the 12 size categories, all with 4-bit codes.
_DC_CODES = {category: (category, 4) for category in range(12)}
# One for AC: a single symbol, end-of-block, coded as the 1-bit code "0".
_EOB = (0, 1)
_QUANT = 8


class _Bits:
    """MSB-first bit writer with JPEG's 0xFF byte stuffing."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.count = 0

    def write(self, value: int, length: int) -> None:
        self.acc = (self.acc << length) | (value & ((1 << length) - 1))
        self.count += length
        while self.count >= 8:
            self.count -= 8
            byte = (self.acc >> self.count) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0)
        self.acc &= (1 << self.count) - 1

    def flush(self) -> bytes:
        if self.count:
            self.write(0x7F, 8 - self.count)
        return bytes(self.out)


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", 0xFF00 | marker, len(payload) + 2) + payload


def encode_jpeg(width: int, height: int, seed: int) -> bytes:
    """A baseline JPEG (YCbCr 4:4:4) whose 8x8 blocks are flat colours."""
    phase = seed % 97
    blocks_x, blocks_y = (width + 7) // 8, (height + 7) // 8
    bits = _Bits()
    previous = [0, 0, 0]
    for by in range(blocks_y):
        for bx in range(blocks_x):
            luma = 40 + (bx * 160 // max(blocks_x, 1) + by * 40 // max(blocks_y, 1) + phase) % 180
            chroma = (128 + (by * 90 // max(blocks_y, 1)) - 45, 128 + ((bx + phase) % 60) - 30)
            for component, level in enumerate((luma, *chroma)):
                dc = (level - 128) * 8 // _QUANT
                diff = dc - previous[component]
                previous[component] = dc
                category = abs(diff).bit_length()
                code, length = _DC_CODES[category]
                bits.write(code, length)
                if category:
                    bits.write(diff if diff > 0 else diff - 1, category)
                bits.write(*_EOB)
    quant = bytes([0]) + bytes([_QUANT] * 64)
    dc_table = bytes([0x00]) + bytes([0, 0, 0, 12] + [0] * 12) + bytes(range(12))
    ac_table = bytes([0x10]) + bytes([1] + [0] * 15) + bytes([0])
    frame = struct.pack(">BHHB", 8, height, width, 3) + b"".join(
        bytes([ident, 0x11, 0]) for ident in (1, 2, 3)
    )
    scan = bytes([3]) + b"".join(bytes([ident, 0x00]) for ident in (1, 2, 3)) + bytes([0, 63, 0])
    return (
        b"\xff\xd8"
        + _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + _segment(0xDB, quant)
        + _segment(0xC0, frame)
        + _segment(0xC4, dc_table)
        + _segment(0xC4, ac_table)
        + _segment(0xDA, scan)
        + bits.flush()
        + b"\xff\xd9"
    )


def image_dimensions(head: bytes) -> tuple[int, int] | None:
    """Width and height from the first bytes of a PNG or JPEG upload, if they say."""
    if head[:8] == PNG_SIGNATURE and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(head) and head[i] == 0xFF:
        marker = head[i + 1]
        length = struct.unpack(">H", head[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", head[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


# ---- video and mesh artifacts ------------------------------------------------------------

BLOCK = 1 << 20


def artifact_chunks(size: int, seed: int, brand: bytes = b"isom") -> Iterator[bytes]:
    """`size` bytes of a deterministic artifact: an `ftyp` box, then one `mdat` box.

    The payload is one pseudo-random MiB repeated, so gigabyte downloads cost no memory and
    no CPU beyond slicing, while the same job always yields the same bytes.
    """
    head = struct.pack(">I4s4sI", 16, b"ftyp", brand, 0x200)
    head += struct.pack(">I4s", min(max(size - 16, 0), 0xFFFFFFFF), b"mdat")
    block = random.Random(seed).randbytes(BLOCK)
    first = head[:size]
    yield first
    remaining = size - len(first)
    while remaining > 0:
        piece = block[: min(remaining, BLOCK)]
        remaining -= len(piece)
        yield piece


def glb_bytes(seed: int) -> bytes:
    """A minimal glTF-binary container with a JSON chunk naming one empty scene."""
    document = json.dumps(
        {
            "asset": {"version": "2.0", "generator": f"simworker-{seed}"},
            "scenes": [{"nodes": []}],
            "scene": 0,
        }
    ).encode()
    document += b" " * (-len(document) % 4)
    body = struct.pack("<I4s", len(document), b"JSON") + document
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


# ---- tensors for rollout answers ---------------------------------------------------------


def tensor(values: list[float], shape: list[int]) -> dict[str, object]:
    """One tensor as the rollout API encodes it: a safetensors file holding tensor "t"."""
    return _encoded(struct.pack(f"<{len(values)}f", *values), shape)


def constant_tensor(value: float, shape: list[int]) -> dict[str, object]:
    """A tensor of `shape` filled with `value`, built without a list of its elements (a
    decoded output is `[3, H, W]` floats)."""
    count = 1
    for side in shape:
        count *= side
    return _encoded(struct.pack("<f", value) * count, shape)


def _encoded(data: bytes, shape: list[int]) -> dict[str, object]:
    header = json.dumps(
        {"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, len(data)]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    blob = struct.pack("<Q", len(header)) + header + data
    return {"__tensor__": True, "data": blob, "shape": shape, "dtype": "torch.float32"}
