"""Fit a scene to a model's input: which bands, what is nodata, and how values are scaled, decided once per run.

:func:`fit_scene` takes the description of the whole file and the model's metadata and returns a :class:`SceneFit`:

- the bands (:func:`segpipe.core.bands.match_bands`: ``--bands``, else by the bands' names, else in order) and
  ``--nodata``, as the scene's :class:`~segpipe.pipeline.read.Selection` (ingest then reads only those bands);
- the pixel map (:class:`~segpipe.core.pixels.PixelMap`): ``--scaling`` when given; else, when the scene's dtype
  does not fit the model's input contract (:class:`~segpipe.models.metadata.InputContract`), the contract's
  scaling, or one clear error when the contract says ``refuse``; a percentile stretch is computed here from a
  bounded sample of the scene's valid pixels (:func:`segpipe.pipeline.read.sample_scene`);
- warnings a user should see: bands taken in order because the file does not name them, values stretched, a
  border of zeros that may be nodata without the file saying so.

Nothing is classified silently: a scene that does not fit is stretched as the model says (with a warning and a
record in the summary) or refused with one line that says what was found, what the model expects and the option
that fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from segpipe.core.bands import BandMatch, match_bands, scene_band_names
from segpipe.core.errors import ConfigError, ModelError
from segpipe.core.pixels import PixelMap, Scaling, fits, pixel_map
from segpipe.pipeline.read import SceneInfo, Selection, sample_scene

if TYPE_CHECKING:
    from segpipe.models.metadata import ModelMetadata

#: A share of sampled pixels that are 0 in every band, above which a scene without nodata gets a hint.
ZERO_BORDER_SHARE = 0.01


@dataclass(frozen=True)
class SceneFit:
    """How a scene feeds a model (see the module docstring).

    Attributes:
        scene: The description of what the run reads (the selected bands, the nodata).
        bands: The bands chosen and how.
        scaling: The scaling applied (text), or None (values used as they are).
        pixel_map: What the scaling gives for this scene, applied to every tile before normalisation; None
            without a scaling, or when it was not computed (``compute=False``).
        warnings: One line each.
    """

    scene: SceneInfo
    bands: BandMatch
    scaling: str | None
    pixel_map: PixelMap | None
    warnings: tuple[str, ...] = ()

    def to_summary(self) -> dict[str, Any]:
        """The ``input`` part of the run summary."""
        return {
            "bands": list(self.bands.indexes),
            "bands_by": self.bands.how,
            "nodata": self.scene.to_attrs()["nodata"],
            "scaling": self.scaling,
            "pixel_map": self.pixel_map.to_dict() if self.pixel_map else None,
            "warnings": list(self.warnings),
        }


def fit_scene(
    file: SceneInfo,
    meta: ModelMetadata,
    *,
    bands: str | None = None,
    nodata: float | None = None,
    scaling: str | None = None,
    compute: bool = True,
) -> SceneFit:
    """Decide how ``file`` (the description of the whole file) feeds the model of ``meta``.

    Args:
        file: :func:`segpipe.pipeline.read.describe_scene` of the input, without a selection.
        meta: The model's metadata.
        bands: ``--bands``.
        nodata: ``--nodata``.
        scaling: ``--scaling`` (overrides the model's contract).
        compute: Compute the pixel map (a percentile stretch reads a sample of the scene); False: only decide
            (what an output key needs: the scaling's text and the scene's fingerprint determine the map).

    Raises:
        ModelError: the scene's bands or values do not fit the model and no option says how (the message names
            the option).
        ConfigError: an option that contradicts the scene.
    """
    names = scene_band_names(file.band_descriptions, file.colour_interpretations)
    match = match_bands(
        meta.bands, names, descriptions=file.band_descriptions, asked=bands, where=f"the scene {file.path!r}"
    )
    selection = Selection(None if match.is_identity(file.count) else match.indexes, nodata)
    scene = file.select(selection)
    warnings = []
    if match.how == "order" and scene.count > 1:
        warnings.append(
            f"the scene's bands are not named; taken in file order as {', '.join(meta.bands)} (--bands to choose)"
        )
    contract = meta.input
    asked = Scaling.parse(scaling) if scaling is not None else None
    chosen: Scaling | None = asked
    if chosen is None and contract is not None and not fits(scene.dtype, contract.range, contract.dtype):
        chosen = Scaling.parse(contract.scaling)
        if chosen.kind == "refuse":
            raise ModelError(
                f"the scene is {scene.dtype} but the model takes {contract.dtype} values in "
                f"{contract.range[0]:g}..{contract.range[1]:g}; say how to scale it: --scaling percentile "
                "(a per-band stretch), --scaling minmax:MIN,MAX, --scaling linear:SCALE,OFFSET or --scaling product "
                "(the product's own scale and offset)"
            )
    if chosen is None or (chosen.kind == "none"):
        return SceneFit(scene, match, None if chosen is None else str(chosen), None, tuple(warnings))
    if chosen.kind in ("minmax", "percentile") and contract is None:
        raise ConfigError(
            f"--scaling {chosen}: the model states no input range to map onto (no 'input' in its metadata); use "
            "--scaling linear:SCALE,OFFSET"
        )
    if not compute:
        return SceneFit(scene, match, str(chosen), None, tuple(warnings))
    value_range = contract.range if contract is not None else (0.0, 1.0)
    sample = None
    if chosen.needs_sample or (nodata is None and scene.nodata is None):
        sample, zero_share = sample_scene(scene)
        if nodata is None and scene.nodata is None and zero_share > ZERO_BORDER_SHARE:
            warnings.append(
                f"{zero_share:.1%} of the sampled pixels are 0 in every band and the scene has no nodata value; "
                "if they are nodata (a border), pass --nodata 0"
            )
    mapped = pixel_map(
        chosen,
        bands=scene.count,
        value_range=value_range,
        sample=sample,
        product=(scene.scales, scene.offsets) if scene.scales else None,
    )
    if asked is None and mapped is not None:
        warnings.insert(
            0,
            f"the scene is {scene.dtype} but the model takes {contract.dtype if contract else '?'} values; scaled "
            f"by {chosen} as the model's input contract says ({_describe_map(mapped)}; --scaling to change)",
        )
    return SceneFit(scene, match, str(chosen), mapped, tuple(warnings))


def _describe_map(mapped: PixelMap) -> str:
    """``per band [lo..hi] -> range`` for a stretch, or the scale and offset."""
    if mapped.clip is None:
        return f"x * {mapped.scale[0]:g} + {mapped.offset[0]:g}"
    lows = [(mapped.clip[0] - b) / a for a, b in zip(mapped.scale, mapped.offset, strict=True)]
    highs = [(mapped.clip[1] - b) / a for a, b in zip(mapped.scale, mapped.offset, strict=True)]
    spans = ", ".join(f"{lo:.4g}..{hi:.4g}" for lo, hi in zip(lows, highs, strict=True))
    return f"bands {spans} -> {mapped.clip[0]:g}..{mapped.clip[1]:g}"
