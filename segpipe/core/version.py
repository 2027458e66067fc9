"""segpipe's version, as the package states it (``segpipe.__version__``) and as outputs record it (output keys, STAC
Items); the distribution's metadata (``pyproject.toml``) states the same (``tests/test_packaging.py``)."""

VERSION = "0.1.0"
