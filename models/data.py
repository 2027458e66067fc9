"""Training data: image/mask pairs from folders, colour-coded masks, random tile sampling.

Layout of one data folder (the Dubai aerial set under ``../shared/data/dubai-aerial/tile-N`` follows it)::

    <folder>/images/<stem>.jpg|.png|.tif   image: any number of bands (RGB uint8 for the Dubai set), one dtype
    <folder>/masks/<stem>.png|.tif         mask: class ids (one band), or colour-coded (RGB or paletted)

or ``images/`` alone, georeferenced, when polygons label them (:mod:`segpipe.models.labels`, :func:`find_images`).

Masks come in three kinds and :func:`read_mask` turns each into a class-id raster (uint8, H x W):

- one band without a palette: the values are class ids;
- one band with a palette (``ColorInterp.palette``): the palette gives each index a colour and the colour
  table maps colours to classes (the Dubai tile-2 and tile-4 masks are paletted, and every file has its own
  palette order, so palette indices are *not* class ids);
- three or four bands: RGB colour-coded (alpha, if present, is not used), mapped with the colour table.

A colour (or a class id) that is not in the table is an :class:`~segpipe.core.errors.InputError` naming the file
and the colour, unless ``unknown="ignore"``: then those pixels get ``ignore_index`` and are left out of the
loss and of the metrics. (Seven Dubai masks have a few hundred to a few thousand pure black #000000 pixels,
which are not a class.)

Training data is small next to a scene (the whole Dubai set is 70 Mpx, 270 MB as uint8), so
:class:`TileDataset` keeps decoded pairs in memory; scenes to segment never go through this module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from rasterio.enums import ColorInterp
from torch.utils.data import Dataset

from segpipe.core.colours import ColourTable, Unknown
from segpipe.core.errors import ConfigError, InputError
from segpipe.core.pixels import normalise
from segpipe.core.raster import open_raster
from segpipe.models.dubai import DEFAULT_VALIDATION_TILE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".tif", ".tiff")



@dataclass(frozen=True)
class SamplePair:
    """One training sample: an image file and its mask file (same width and height)."""

    image: Path
    mask: Path


def find_sample_pairs(folder: str | Path) -> list[SamplePair]:
    """List the image/mask pairs of one data folder (``images/`` and ``masks/`` matched by file stem).

    Raises:
        InputError: the folder or its ``images``/``masks`` subfolders are missing, it holds no image, or an
            image has no mask.
    """
    root = Path(folder)
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise InputError(f"{root}: expected a data folder with 'images/' and 'masks/' subfolders; check the path")
    masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() in MASK_SUFFIXES}
    pairs: list[SamplePair] = []
    missing: list[str] = []
    for image in sorted(images_dir.iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = masks.pop(image.stem, None)
        if mask is None:
            missing.append(image.name)
        else:
            pairs.append(SamplePair(image, mask))
    if missing:
        raise InputError(
            f"{root}: no mask in {masks_dir} for image(s) {', '.join(missing[:5])}; "
            f"add masks with the same file stem or remove the images"
        )
    if masks:
        log.warning("%s: masks without an image are not used: %s", root, ", ".join(sorted(masks)[:5]))
    if not pairs:
        raise InputError(f"{root}: no image in {images_dir} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return pairs


def find_images(folder: str | Path) -> list[Path]:
    """The images of one data folder labelled by polygons (``<folder>/images/``, sorted by name).

    Raises:
        InputError: the folder has no ``images/`` subfolder, or it holds no image.
    """
    root = Path(folder)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise InputError(f"{root}: expected a data folder with an 'images/' subfolder; check the path")
    if (root / "masks").is_dir():
        log.warning("%s: masks/ is not used: the labels are the polygons of --labels", root)
    images = [p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise InputError(f"{root}: no image in {images_dir} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


@dataclass(frozen=True)
class ImageBands:
    """What an image file says of its bands (its header only).

    Attributes:
        path: The file.
        count: Number of bands.
        dtype: numpy dtype name of its values (the first band's).
        descriptions: GDAL band descriptions ("" where none).
        colour_interpretations: GDAL colour interpretations, lower-case (``red``, ``gray``, ``undefined`` ...).
    """

    path: Path
    count: int
    dtype: str
    descriptions: tuple[str, ...]
    colour_interpretations: tuple[str, ...]


def image_bands(path: str | Path) -> ImageBands:
    """The bands of an image file, from its header (no pixel is read)."""
    path = Path(path)
    with open_raster(str(path), role="image", hint="give a JPEG, PNG or TIFF image") as src:
        dtypes = set(src.dtypes)
        if len(dtypes) > 1:
            raise InputError(f"{path}: its bands have different types ({', '.join(sorted(dtypes))}); give one type")
        return ImageBands(
            path,
            src.count,
            str(src.dtypes[0]),
            tuple(d or "" for d in src.descriptions),
            tuple(c.name.lower() for c in src.colorinterp),
        )


def read_image(path: str | Path, *, bands: Sequence[int] | None = None) -> np.ndarray:
    """Read a whole (small, training) image as a (C, H, W) array in its own dtype.

    Args:
        path: Any raster GDAL reads (JPG and PNG included; missing georeferencing is fine).
        bands: 1-based band indexes to read, in order; default all bands.
    """
    path = Path(path)
    with open_raster(str(path), role="image", hint="give a JPEG, PNG or TIFF image") as src:
        indexes = list(bands) if bands is not None else list(range(1, src.count + 1))
        if max(indexes) > src.count or min(indexes) < 1:
            raise InputError(f"{path}: has {src.count} band(s), cannot read bands {indexes}")
        return src.read(indexes)


def read_mask(
    path: str | Path,
    *,
    colour_table: ColourTable | None,
    num_classes: int | None = None,
    unknown: Unknown = "error",
    ignore_index: int = 255,
) -> np.ndarray:
    """Read a mask as (H, W) uint8 class ids (see the module docstring for the three kinds of masks).

    Args:
        path: Mask file.
        colour_table: Needed for colour-coded masks (RGB or paletted); ``None`` reads one band as class ids.
        num_classes: Number of classes, to check class-id masks; default ``len(colour_table)``.
        unknown: What to do with a colour or class id outside the table: "error" or "ignore".
        ignore_index: Value given to ignored pixels; values equal to it in a class-id mask stay ignored.
    """
    path = Path(path)
    if num_classes is None and colour_table is not None:
        num_classes = len(colour_table)
    with open_raster(str(path), role="mask", hint="give a PNG or TIFF mask") as src:
        data = src.read()
        paletted = src.count == 1 and src.colorinterp[0] == ColorInterp.palette
        colormap = src.colormap(1) if paletted else None
    if not np.issubdtype(data.dtype, np.integer):
        raise InputError(f"{path}: expected an integer mask, got {data.dtype}; masks hold class ids or colours")
    if data.shape[0] >= 3:
        if colour_table is None:
            raise ConfigError(f"{path}: is a colour-coded mask ({data.shape[0]} bands); pass a colour table")
        if data.dtype != np.uint8:
            raise InputError(f"{path}: expected 8-bit colours in an RGB mask, got {data.dtype}")
        return colour_table.to_class_ids(data[:3], source=str(path), unknown=unknown, ignore_index=ignore_index)
    if colormap is not None and colour_table is not None:
        return _palette_ids(data[0], colormap, colour_table, path, unknown, ignore_index)
    if num_classes is None:
        raise ConfigError(f"{path}: is a class-id mask; pass num_classes or a colour table to check it")
    return _checked_ids(data[0], num_classes, path, unknown, ignore_index)


def _palette_ids(
    band: np.ndarray,
    colormap: dict[int, tuple[int, ...]],
    colour_table: ColourTable,
    path: Path,
    unknown: Unknown,
    ignore_index: int,
) -> np.ndarray:
    """Class ids (H, W) uint8 of a paletted mask: palette index -> colour -> class id, through a 256-entry lookup
    table; unused palette entries (Dubai palettes carry an unused white) only matter if a pixel uses them."""
    lut_rgb = np.zeros((3, 1, 256), dtype=np.uint8)
    for index, rgba in colormap.items():
        if 0 <= index < 256:
            lut_rgb[:, 0, index] = rgba[:3]
    used = np.unique(band)
    used_ids = colour_table.to_class_ids(
        lut_rgb[:, :, used], source=str(path), unknown=unknown, ignore_index=ignore_index
    )[0]
    lut = np.full(256, ignore_index, dtype=np.uint8)
    lut[used] = used_ids
    return lut[band]


def _checked_ids(band: np.ndarray, num_classes: int, path: Path, unknown: Unknown, ignore_index: int) -> np.ndarray:
    """Class ids (H, W) uint8 of a class-id mask, values outside 0..``num_classes``-1 (``ignore_index`` aside) an
    error or, with ``unknown="ignore"``, set to ``ignore_index``."""
    values = band.astype(np.int64, copy=False)
    bad = (values < 0) | ((values >= num_classes) & (values != ignore_index))
    if bad.any():
        odd = np.unique(values[bad])
        if unknown == "error":
            raise InputError(
                f"{path}: class id(s) {odd[:5].tolist()} outside 0..{num_classes - 1} (ignore index "
                f"{ignore_index}); fix the mask or pass unknown='ignore'"
            )
        log.info(
            "%s: %d px of class id(s) %s set to ignore index %d",
            path,
            int(bad.sum()),
            odd[:5].tolist(),
            ignore_index,
        )
    out = values.astype(np.uint8)
    out[bad] = ignore_index
    return out


def load_pair(
    pair: SamplePair,
    *,
    colour_table: ColourTable | None,
    num_classes: int | None = None,
    bands: Sequence[int] | None = None,
    unknown: Unknown = "error",
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an image (C, H, W) and its mask (H, W) and check that their sizes match.

    Raises:
        InputError: the sizes differ, or the mask cannot be mapped (see :func:`read_mask`).
    """
    image = read_image(pair.image, bands=bands)
    mask = read_mask(
        pair.mask,
        colour_table=colour_table,
        num_classes=num_classes,
        unknown=unknown,
        ignore_index=ignore_index,
    )
    if image.shape[1:] != mask.shape:
        raise InputError(
            f"{pair.image} is {image.shape[2]}x{image.shape[1]} px but its mask {pair.mask} is "
            f"{mask.shape[1]}x{mask.shape[0]} px (width x height); image and mask must cover the same pixels"
        )
    return image, mask


def load_folders(
    folders: Iterable[str | Path],
    *,
    colour_table: ColourTable | None,
    num_classes: int | None = None,
    bands: Sequence[int] | None = None,
    unknown: Unknown = "error",
    ignore_index: int = 255,
) -> tuple[list[np.ndarray], list[np.ndarray], list[SamplePair]]:
    """Load every pair of the given data folders: (images, masks, pairs), in folder then file order."""
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    pairs: list[SamplePair] = []
    for folder in folders:
        for pair in find_sample_pairs(folder):
            image, mask = load_pair(
                pair,
                colour_table=colour_table,
                num_classes=num_classes,
                bands=bands,
                unknown=unknown,
                ignore_index=ignore_index,
            )
            images.append(image)
            masks.append(mask)
            pairs.append(pair)
    if not pairs:
        raise InputError("no data folder given; pass at least one folder with images/ and masks/")
    return images, masks, pairs


def split_folders(
    root_or_folders: str | Path | Iterable[str | Path],
    *,
    validation: str | Sequence[str] = DEFAULT_VALIDATION_TILE,
) -> tuple[list[Path], list[Path]]:
    """Split data folders into training and validation folders by holding out whole folders.

    Whole tiles (areas) are held out, never single images, so neighbouring, overlapping images of one area
    cannot leak into training.

    Args:
        root_or_folders: A directory whose subfolders are data folders (``dubai-aerial``), or the folders.
        validation: Name(s) of the folder(s) to hold out; default :data:`DEFAULT_VALIDATION_TILE`.

    Returns:
        (training folders, validation folders), each sorted by name.
    """
    if isinstance(root_or_folders, str | Path):
        root = Path(root_or_folders)
        if not root.is_dir():
            raise InputError(f"{root}: not a directory of data folders; check the path")
        folders = sorted(p for p in root.iterdir() if (p / "images").is_dir())
    else:
        folders = sorted(Path(p) for p in root_or_folders)
    held = {validation} if isinstance(validation, str) else set(validation)
    names = {p.name for p in folders}
    if not held <= names:
        raise ConfigError(f"expected validation folder(s) among {sorted(names)}, got {sorted(held - names)}")
    train = [p for p in folders if p.name not in held]
    val = [p for p in folders if p.name in held]
    if not train:
        raise ConfigError("holding out the validation folder(s) leaves no training folder")
    return train, val


def pixel_counts(masks: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
    """Pixels per class id 0..num_classes-1 over the masks (other values, e.g. the ignore index, skipped)."""
    total = np.zeros(num_classes, dtype=np.int64)
    for mask in masks:
        total += np.bincount(mask.ravel(), minlength=256)[:num_classes]
    return total


def class_weights(
    counts: np.ndarray,
    method: Literal["median_frequency", "inverse_sqrt"],
    *,
    exclude: Sequence[int] = (),
    max_ratio: float = 10.0,
) -> np.ndarray:
    """Loss weights per class from pixel counts.

    ``median_frequency``: w_c = median(f) / f_c (Eigen & Fergus 2015). ``inverse_sqrt``: w_c = 1 / sqrt(f_c).
    Weights are then clipped to ``[max / max_ratio, max]`` and scaled so that the pixel-weighted mean weight
    is 1 (the loss keeps its scale). Classes in ``exclude`` or without pixels get weight 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    valid = counts > 0
    valid[list(exclude)] = False
    if not valid.any():
        raise InputError("no labelled pixel of any (non-excluded) class in the training masks")
    freq = counts[valid] / counts[valid].sum()
    w = np.median(freq) / freq if method == "median_frequency" else 1.0 / np.sqrt(freq)
    w = np.clip(w, w.max() / max_ratio, None)
    w = w / float((w * freq).sum())
    out = np.zeros(len(counts), dtype=np.float64)
    out[valid] = w
    return out


class TileDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random square tiles from in-memory image/mask pairs, with flips and 90-degree rotations.

    Sample ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: the same tiles come back in any
    process, with any number of DataLoader workers, and after a resume, without saving any random state.
    Call :meth:`set_epoch` before each epoch.

    An image is picked with probability proportional to its area (every pixel equally likely) or uniformly;
    then a tile position uniformly; then one of the 8 dihedral transforms (4 rotations x optional flip);
    with ``scale_jitter`` = s > 0, the tile first covers ``round(T * f)`` image pixels, with a zoom factor f
    drawn log-uniformly from [1 / (1 + s), 1 + s], resampled to T x T (image: bilinear, antialiased when
    shrinking; mask: nearest): it imitates the differences in ground sample distance (m/px) between areas;
    then, if ``colour_jitter`` = j > 0, a colour change x * g_c + o, clipped to 0-255, with a gain g_c per band
    drawn from [1 - j, 1 + j] and one offset o from [-128 j, 128 j] (0-255 units): it imitates the
    exposure and white-balance differences between areas, which a held-out area exposes; then, if
    ``saturation_jitter`` = q > 0 (and the image has more than one band), each pixel is moved away from or
    towards its grey value (the mean over bands) by a factor drawn from [1 - q, 1 + q], clipped to 0-255: at
    q = 1 some tiles are nearly grey, which teaches the network not to lean on hue alone (a held-out area's
    water may be greener, its vegetation bluer, than any training area's).
    Images smaller than the tile are padded: the image with the mean (0 after normalisation), the mask with
    ``ignore_index``. The clips are to ``value_range`` (0-255 by default, the range of 8-bit images; the range of
    the images' dtype for others, None: no clip).

    Items are ``(image, mask)``: float32 (C, T, T) normalised as (x - mean) / std in the images' units, and int64
    (T, T).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        *,
        tile_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        length: int,
        seed: int = 0,
        augment: bool = True,
        weight_by_area: bool = True,
        colour_jitter: float = 0.0,
        scale_jitter: float = 0.0,
        saturation_jitter: float = 0.0,
        ignore_index: int = 255,
        value_range: tuple[float, float] | None = (0.0, 255.0),
    ) -> None:
        if len(images) != len(masks) or not images:
            raise ConfigError(f"expected as many masks as images (at least one), got {len(images)} and {len(masks)}")
        if tile_size < 1 or length < 1:
            raise ConfigError(f"expected tile_size >= 1 and length >= 1, got {tile_size} and {length}")
        channels = images[0].shape[0]
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"expected {channels} mean and std values (one per band), got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ConfigError(f"expected std > 0, got {tuple(std)}")
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            if image.shape[0] != channels or image.shape[1:] != mask.shape:
                raise InputError(
                    f"pair {i}: image shape {image.shape} does not fit mask shape {mask.shape} "
                    f"({channels} bands expected)"
                )
        self.images = list(images)
        self.masks = list(masks)
        self.tile_size = tile_size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self.length = length
        self.seed = seed
        self.augment = augment
        self.ignore_index = ignore_index
        if not 0 <= colour_jitter < 1:
            raise ConfigError(f"expected 0 <= colour_jitter < 1, got {colour_jitter}")
        self.colour_jitter = colour_jitter
        if not 0 <= scale_jitter <= 1:
            raise ConfigError(f"expected 0 <= scale_jitter <= 1 (zoom factors 1/(1+s)..1+s), got {scale_jitter}")
        self.scale_jitter = scale_jitter
        if not 0 <= saturation_jitter <= 1:
            raise ConfigError(f"expected 0 <= saturation_jitter <= 1, got {saturation_jitter}")
        self.saturation_jitter = saturation_jitter
        self.value_range = value_range
        self.epoch = 0
        areas = np.array([m.size for m in masks], dtype=np.float64)
        self.probabilities = areas / areas.sum() if weight_by_area else np.full(len(masks), 1 / len(masks))

    def set_epoch(self, epoch: int) -> None:
        """Select the tiles of ``epoch`` (0-based)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = int(rng.choice(len(self.images), p=self.probabilities))
        image, mask = self.images[k], self.masks[k]
        t = self.tile_size
        if self.scale_jitter > 0:  # c image pixels become the t tile pixels
            bound = math.log1p(self.scale_jitter)
            c = max(1, round(t * math.exp(rng.uniform(-bound, bound))))
        else:
            c = t
        h, w = mask.shape
        y = int(rng.integers(0, max(h - c, 0) + 1))
        x = int(rng.integers(0, max(w - c, 0) + 1))
        rot, flip = (int(rng.integers(0, 4)), bool(rng.integers(0, 2))) if self.augment else (0, False)
        raw = image[:, y : y + c, x : x + c]
        if self.colour_jitter > 0:
            j = self.colour_jitter
            gain = rng.uniform(1 - j, 1 + j, size=(raw.shape[0], 1, 1))
            offset = rng.uniform(-j, j) * 128.0
            raw = self._clip(raw.astype(np.float32) * gain.astype(np.float32) + np.float32(offset))
        if self.saturation_jitter > 0 and raw.shape[0] > 1:
            q = self.saturation_jitter
            factor = np.float32(rng.uniform(1 - q, 1 + q))
            grey = raw.astype(np.float32).mean(axis=0, keepdims=True)
            raw = self._clip(grey + factor * (raw.astype(np.float32) - grey))
        img = normalise(raw, self.mean, self.std)
        msk = mask[y : y + c, x : x + c]
        if img.shape[1:] != (c, c):
            ph, pw = c - img.shape[1], c - img.shape[2]
            img = np.pad(img, ((0, 0), (0, ph), (0, pw)))
            msk = np.pad(msk, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        if c != t:
            img, msk = _resample(img, msk, t)
        if self.augment:
            img = np.rot90(img, rot, axes=(1, 2))
            msk = np.rot90(msk, rot, axes=(0, 1))
            if flip:
                img = img[:, :, ::-1]
                msk = msk[:, ::-1]
        return (
            torch.from_numpy(np.ascontiguousarray(img)),
            torch.from_numpy(np.ascontiguousarray(msk).astype(np.int64)),
        )

    def _clip(self, values: np.ndarray) -> np.ndarray:
        """``values`` clipped to :attr:`value_range` (as they are without one)."""
        if self.value_range is None:
            return values
        return np.clip(values, self.value_range[0], self.value_range[1])


def _resample(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample a (C, c, c) float32 image and its (c, c) mask to ``size`` x ``size`` pixels.

    The image bilinearly (antialiased when shrinking, pixel centres aligned), the mask by nearest neighbour
    at the same pixel centres, so labels stay labels (class ids and the ignore index, never blends).
    """
    shrink = image.shape[-1] > size
    img = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(image))[None], size=(size, size), mode="bilinear",
        align_corners=False, antialias=shrink,
    )[0].numpy()
    msk = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(mask))[None, None].float(), size=(size, size), mode="nearest-exact"
    )[0, 0].numpy().astype(mask.dtype)
    return img, msk


def band_statistics(images: Iterable[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and standard deviation over all pixels of the images, in their units (0-255 for 8-bit)."""
    total: np.ndarray | None = None
    total_sq: np.ndarray | None = None
    n = 0
    for image in images:
        x = image.reshape(image.shape[0], -1).astype(np.float64)
        s, sq = x.sum(axis=1), (x * x).sum(axis=1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        n += x.shape[1]
    if total is None or total_sq is None or n == 0:
        raise InputError("no image pixels to compute band statistics from")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
