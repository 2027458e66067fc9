"""Bands: which of a scene's bands feed which of a model's inputs. Pure functions, no I/O.

A model names its input bands with STAC common names (``red``, ``green``, ``blue``, ``nir``, ``swir16`` ...; see
:data:`COMMON_NAMES`). A scene's bands get names from what the file says of them (:func:`scene_band_names`): a
band description that is a common name (any case) or a Sentinel-2 band name (``B04``/``B4`` when the scene's
descriptions are Sentinel-2's, recognised by ``B8A``), or the colour interpretation (red, green, blue). Matching
(:func:`match_bands`):

1. ``--bands 4,3,2``: those band numbers (1-based), in the model's order;
2. ``--bands red,green,blue``: those names, looked up in the scene's names;
3. no ``--bands``: when the scene names every band the model takes (by common name, or by the model's own band
   names in the scene's descriptions, e.g. ``B4``), those bands; when it names none of them and has as many bands
   as the model, its bands in order (the file cannot tell; a warning says so);
4. anything else is refused with one line saying what the scene has, what the model takes and the ``--bands`` that
   would fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from segpipe.core.errors import ConfigError, ModelError

#: STAC ``eo:bands`` common names (STAC 1.0 eo extension) and the aliases GDAL colour interpretations use.
COMMON_NAMES = (
    "coastal", "blue", "green", "red", "yellow", "pan", "rededge", "rededge071", "rededge075", "rededge078",
    "nir", "nir08", "nir09", "cirrus", "swir16", "swir22", "lwir", "lwir11", "lwir12",
)  # fmt: skip

#: Sentinel-2 MSI band names and their common names (the scene's descriptions must include B8A to use them).
SENTINEL2 = {
    "B1": "coastal", "B2": "blue", "B3": "green", "B4": "red", "B5": "rededge071", "B6": "rededge075",
    "B7": "rededge078", "B8": "nir", "B8A": "nir08", "B9": "nir09", "B10": "cirrus", "B11": "swir16", "B12": "swir22",
}  # fmt: skip

_COLOUR_INTERPRETATIONS = {"red": "red", "green": "green", "blue": "blue"}


@dataclass(frozen=True)
class BandMatch:
    """The scene's bands (1-based numbers) feeding the model's inputs, in the model's order, and how they were found.

    Attributes:
        indexes: One scene band number per model band.
        how: ``"--bands"``, ``"names"`` or ``"order"`` (unnamed bands taken in order).
    """

    indexes: tuple[int, ...]
    how: str

    def is_identity(self, count: int) -> bool:
        """Whether this selects all ``count`` bands of the scene in their own order."""
        return self.indexes == tuple(range(1, count + 1))


def _sentinel2_key(text: str) -> str | None:
    """``B04``, ``b4``, ``B8A`` -> the key of :data:`SENTINEL2`, or None."""
    upper = text.strip().upper()
    if not upper.startswith("B"):
        return None
    number = upper[1:].lstrip("0") or "0"
    key = f"B{number}"
    return key if key in SENTINEL2 else None


def scene_band_names(descriptions: Sequence[str], colour_interpretations: Sequence[str]) -> tuple[str, ...]:
    """A common name per band of a scene ("" where the file does not say).

    Args:
        descriptions: GDAL band descriptions ("" where none).
        colour_interpretations: GDAL colour interpretation names, lower-case (``red``, ``gray``, ``undefined`` ...).
    """
    sentinel2 = any(_sentinel2_key(d) == "B8A" for d in descriptions)
    names = []
    for k, description in enumerate(descriptions):
        text = description.strip().lower()
        interpretation = colour_interpretations[k] if k < len(colour_interpretations) else ""
        if text in COMMON_NAMES:
            names.append(text)
        elif sentinel2 and (key := _sentinel2_key(description)):
            names.append(SENTINEL2[key])
        else:
            names.append(_COLOUR_INTERPRETATIONS.get(interpretation, ""))
    return tuple(names)


def _described(names: Sequence[str], descriptions: Sequence[str]) -> str:
    parts = []
    for k, name in enumerate(names):
        label = descriptions[k] if k < len(descriptions) and descriptions[k] else ""
        shown = "/".join(dict.fromkeys(x for x in (label, name) if x)) or "unnamed"
        parts.append(f"{k + 1}={shown}")
    return ", ".join(parts)


def parse_bands(text: str) -> tuple[int, ...] | tuple[str, ...]:
    """``"4,3,2"`` -> (4, 3, 2); ``"red,green,blue"`` -> ("red", "green", "blue").

    Raises:
        ConfigError: empty, mixed, repeated, or a number below 1.
    """
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ConfigError(f"--bands must list band numbers (4,3,2) or names (red,green,blue), got {text!r}")
    if len(set(p.lower() for p in parts)) != len(parts):
        raise ConfigError(f"--bands names a band twice: {text!r}")
    if all(p.isdigit() for p in parts):
        numbers = tuple(int(p) for p in parts)
        if min(numbers) < 1:
            raise ConfigError(f"--bands numbers start at 1, got {text!r}")
        return numbers
    if any(p.isdigit() for p in parts):
        raise ConfigError(f"--bands must be all numbers or all names, got {text!r}")
    return tuple(p.lower() for p in parts)


def band_numbers(
    chosen: Sequence[int] | Sequence[str],
    names: Sequence[str],
    described: Sequence[str],
    *,
    asked: str,
    where: str,
    have: str,
    hint: str = "give band numbers instead",
) -> tuple[int, ...]:
    """The 1-based bands of a scene that ``chosen`` (:func:`parse_bands` of ``--bands`` ``asked``) picks: numbers as
    given (at most the scene's count), names by the scene's common ``names``, else by its lower-cased ``described``
    descriptions.

    Raises:
        ConfigError: a number beyond the scene's bands, or a name it does not have (``have`` lists its bands).
    """
    if isinstance(chosen[0], int):
        numbers = tuple(int(c) for c in chosen)
        beyond = [n for n in numbers if n > len(names)]
        if beyond:
            raise ConfigError(f"--bands {asked}: {where} has {len(names)} band(s), no band {beyond[0]}")
        return numbers
    indexes = []
    for name in chosen:
        if name in names:
            indexes.append(list(names).index(str(name)) + 1)
        elif name in described:
            indexes.append(list(described).index(str(name)) + 1)
        else:
            raise ConfigError(f"--bands {asked}: {where} has no band named {name!r} (its bands: {have}); {hint}")
    return tuple(indexes)


def match_bands(
    model_bands: Sequence[str],
    scene_names: Sequence[str],
    *,
    descriptions: Sequence[str] = (),
    asked: str | None = None,
    where: str = "the scene",
) -> BandMatch:
    """The scene bands that feed the model (see the module docstring).

    Args:
        model_bands: The model's input band names, in input order.
        scene_names: :func:`scene_band_names` of the scene (one per band, "" where unknown).
        descriptions: The scene's band descriptions, quoted in errors.
        asked: The ``--bands`` option, or None.
        where: The scene as named in errors.

    Raises:
        ConfigError: ``--bands`` names bands the scene does not have, or their number differs from the model's.
        ModelError: the scene's bands cannot be matched to the model's without ``--bands``.
    """
    count = len(scene_names)
    wanted = [b.lower() for b in model_bands]
    have = _described(scene_names, descriptions)
    described = [d.strip().lower() for d in descriptions]
    if asked is not None:
        chosen = parse_bands(asked)
        if len(chosen) != len(wanted):
            raise ConfigError(
                f"--bands {asked} gives {len(chosen)} band(s) but the model takes {len(wanted)} "
                f"({', '.join(model_bands)}); give one per model band, in that order"
            )
        hint = "give band numbers instead, e.g. --bands " + ",".join(str(k) for k in range(1, len(wanted) + 1))
        numbers = band_numbers(chosen, scene_names, described, asked=asked, where=where, have=have, hint=hint)
        if isinstance(chosen[0], int):
            _check_names(wanted, numbers, scene_names, have, asked=asked)
        return BandMatch(numbers, "--bands")
    for names in (scene_names, described):
        if all(b in names for b in wanted):
            return BandMatch(tuple(names.index(b) + 1 for b in wanted), "names")
    if count == len(wanted) and not any(scene_names):
        return BandMatch(tuple(range(1, count + 1)), "order")
    takes = f"the model takes {len(wanted)} band(s) ({', '.join(model_bands)})"
    if count < len(wanted):
        raise ModelError(f"{takes} but {where} has only {count} ({have}); choose a model trained on this imagery")
    hint = ",".join(str(scene_names.index(b) + 1) if b in scene_names else "N" for b in wanted)
    raise ModelError(
        f"{takes} but {where} has {count} ({have}); choose them with --bands, e.g. --bands {hint} (band numbers, "
        f"in the model's order) or --bands {','.join(wanted)} when the file names them"
    )


def _check_names(
    wanted: Sequence[str], numbers: Sequence[int], scene_names: Sequence[str], have: str, *, asked: str
) -> None:
    """Refuse band numbers whose known names contradict the model's (both sides named)."""
    for want, number in zip(wanted, numbers, strict=True):
        name = scene_names[number - 1]
        if name and want in COMMON_NAMES and name != want:
            raise ModelError(
                f"--bands {asked}: band {number} of the scene is {name!r} but the model's input there is "
                f"{want!r} (the scene's bands: {have}); check the band order"
            )
