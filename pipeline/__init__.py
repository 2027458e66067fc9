"""segpipe.pipeline: see the package docstring of :mod:`segpipe`."""

if __name__ != "segpipe.pipeline":  # the folder is mapped into the segpipe package (pyproject.toml)
    raise ImportError(f"import segpipe.pipeline, not {__name__}: this folder is part of the segpipe package")
