"""What a user asks of a run: :class:`RunOptions` (every per-scene option, stated once) and :class:`RunSettings`
(one scene: input, outputs and those options).

Each field is declared with :func:`segpipe.core.options.option`: its default and help live here and nowhere
else. The ``segpipe run``, ``dataset`` and ``serve`` commands build their flags from these fields, the Prefect
flows take these objects as parameters, and the run summary records them. Values are checked on construction
(``ConfigError`` naming the flag); what needs the scene or the model is checked by
:func:`segpipe.pipeline.plan.make_plan`. ``None`` means "the model's or the machine's default".
"""

from __future__ import annotations

from dataclasses import dataclass

from segpipe.core.errors import ConfigError
from segpipe.core.options import option
from segpipe.core.runtime import DEVICES
from segpipe.pipeline.merge import MERGERS

EXECUTORS = ("auto", "ray", "local")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The options of a run that apply to every scene (see the module docstring)."""

    model: str = option("default", help="model name or checkpoint path (default: the shipped model)")
    tile_size: int | None = option(None, help="tile core size in pixels (default: the model's)", metavar="N")
    halo: int | None = option(
        None, help="context margin around each tile in pixels (default: the model's)", metavar="N"
    )
    blend: str = option(
        "crop",
        help="crop (default): each tile's core, written directly; cosine/gaussian: blend overlapping tiles",
        choices=tuple(MERGERS),
    )
    batch_size: int | None = option(None, help="tiles per forward pass (default: by device and tile size)", metavar="N")
    workers: int | None = option(None, help="segmenter actors (default: one per GPU, or one on CPU)", metavar="N")
    device: str = option("auto", help="where the model runs (default: auto, a GPU when there is one)", choices=DEVICES)
    work_dir: str | None = option(
        None, help="keep zarr work stores here (created if missing); a re-run with it resumes", metavar="DIR"
    )
    ray_address: str | None = option(
        None, help="an existing Ray cluster (auto, ray://host:10001); default: a local instance", metavar="ADDR"
    )
    ray_connect_timeout: float = option(
        30.0, help="seconds to wait for the Ray cluster of --ray-address to answer", metavar="S"
    )
    overwrite: bool = option(False, help="replace existing outputs")
    executor: str = option(
        "auto",
        help="auto (default): Ray where it pays (several workers or GPUs, more than a few tiles, a cluster); ray; "
        "local: in this process, without Ray",
        choices=EXECUTORS,
    )

    def __post_init__(self) -> None:
        if self.blend not in MERGERS:
            raise ConfigError(f"--blend must be one of {', '.join(MERGERS)}, got {self.blend!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {self.device!r}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not self.ray_connect_timeout > 0:
            raise ConfigError(f"--ray-connect-timeout must be > 0 seconds, got {self.ray_connect_timeout}")
        for name in ("tile_size", "halo"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


@dataclass(frozen=True, kw_only=True)
class RunSettings(RunOptions):
    """One scene's run: the scene, where its outputs go, and the run's options.

    Attributes:
        input: The scene: a path, URL or GDAL path.
        output: The mask to write.
        probabilities: Also write per-class probabilities there.
    """

    input: str
    output: str
    probabilities: str | None = None

    @classmethod
    def for_scene(
        cls, options: RunOptions, *, input: str, output: str, probabilities: str | None = None
    ) -> RunSettings:
        """Settings for one scene with the given options."""
        values = {name: getattr(options, name) for name in RunOptions.__dataclass_fields__}
        return cls(input=input, output=output, probabilities=probabilities, **values)

    @property
    def options(self) -> RunOptions:
        """The per-scene options alone."""
        return RunOptions(**{name: getattr(self, name) for name in RunOptions.__dataclass_fields__})
