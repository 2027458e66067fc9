"""COG creation options as rio users give them (``--co NAME=VALUE``), checked before any work starts.

Only options that change how the file is stored, never its pixels, are taken: masks are class ids, so a lossy codec
(JPEG, WEBP, LERC with an error) would change them. Names are GDAL's COG driver names, case-insensitive;
:func:`parse_cog_options` returns them upper-cased, merged over segpipe's defaults by the exporter.
"""

from __future__ import annotations

from collections.abc import Iterable

from segpipe.core.errors import ConfigError

#: Lossless codecs of GDAL's COG driver, and the LEVEL range each takes (None: no LEVEL).
CODECS: dict[str, tuple[int, int] | None] = {
    "DEFLATE": (1, 12),
    "ZSTD": (1, 22),
    "LZMA": (0, 9),
    "LZW": None,
    "PACKBITS": None,
    "NONE": None,
}
LOSSY = ("JPEG", "WEBP", "LERC", "LERC_DEFLATE", "LERC_ZSTD", "JXL")
PREDICTORS = ("YES", "NO", "STANDARD")
BIGTIFF = ("YES", "NO", "IF_NEEDED", "IF_SAFER")
NAMES = ("COMPRESS", "LEVEL", "PREDICTOR", "BLOCKSIZE", "BIGTIFF")


def _split(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ConfigError(f"--co takes NAME=VALUE (e.g. COMPRESS=ZSTD), got {item!r}")
    return name.strip().upper(), value.strip().upper()


def _check_value(name: str, value: str, codec: str | None) -> None:
    if name == "COMPRESS":
        if value in LOSSY:
            raise ConfigError(f"--co COMPRESS={value} is lossy and would change class ids; use {', '.join(CODECS)}")
        if value not in CODECS:
            raise ConfigError(f"--co COMPRESS must be one of {', '.join(CODECS)}, got {value!r}")
    elif name == "LEVEL":
        levels = CODECS.get(codec or "DEFLATE")
        if levels is None:
            raise ConfigError(f"--co LEVEL does not apply to COMPRESS={codec}; leave it out")
        if not value.isdigit() or not levels[0] <= int(value) <= levels[1]:
            raise ConfigError(f"--co LEVEL for {codec or 'DEFLATE'} must be {levels[0]}-{levels[1]}, got {value!r}")
    elif name == "PREDICTOR":
        if value not in (*PREDICTORS, "1", "2"):
            raise ConfigError(f"--co PREDICTOR must be YES, NO or STANDARD, got {value!r}")
    elif name == "BLOCKSIZE":
        if not value.isdigit() or int(value) % 16 or not 64 <= int(value) <= 4096:
            raise ConfigError(f"--co BLOCKSIZE must be a multiple of 16 from 64 to 4096 pixels, got {value!r}")
    elif name == "BIGTIFF" and value not in BIGTIFF:
        raise ConfigError(f"--co BIGTIFF must be one of {', '.join(BIGTIFF)}, got {value!r}")


def parse_cog_options(items: Iterable[str]) -> dict[str, str]:
    """``("COMPRESS=zstd", "LEVEL=9")`` -> ``{"COMPRESS": "ZSTD", "LEVEL": "9"}``, checked (pure).

    Raises:
        ConfigError: not NAME=VALUE, a name segpipe does not take, a lossy codec, a value out of range, a name
            given twice.
    """
    found: dict[str, str] = {}
    for item in items:
        name, value = _split(item)
        if name not in NAMES:
            raise ConfigError(f"--co {name} is not a COG creation option segpipe takes; use {', '.join(NAMES)}")
        if name in found:
            raise ConfigError(f"--co {name} is given twice")
        found[name] = {"1": "NO", "2": "YES"}.get(value, value) if name == "PREDICTOR" else value
    for name, value in found.items():
        _check_value(name, value, found.get("COMPRESS"))
    return found
