"""The ground layer: small modules that every other layer may import and that import nothing of segpipe above.

- :mod:`~segpipe.core.errors`: the root exception type and its four kinds;
- :mod:`~segpipe.core.tiles`: tile-grid arithmetic (pixels) and reading a tile's input from arrays;
- :mod:`~segpipe.core.blend`: blend weights of overlapping tiles;
- :mod:`~segpipe.core.metrics`: confusion matrix, IoU and friends;
- :mod:`~segpipe.core.colours`: ``#RRGGBB`` colours, colour tables, colourised masks;
- :mod:`~segpipe.core.pixels`: normalisation for a model, contrast stretch for display;
- :mod:`~segpipe.core.files`: atomic writes;
- :mod:`~segpipe.core.raster`: opening rasters with GDAL (paths, URLs, retries, one clear error);
- :mod:`~segpipe.core.runtime`: CPU cores, devices, allocator settings.
"""
