"""The Triton-style repository on local disk: ``<root>/<model>/[config.pbtxt]``, ``<v>/model.onnx``.

This module only reads the layout; it never executes anything. Remote origins (edge caches)
materialise a model into such a directory and then hand it to the same code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import InvalidInput, ModelLoadError, ModelNotFound
from gateway.repository.config import ModelConfig, load_config

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
_VERSION = re.compile(r"[0-9]{1,18}")  # ASCII digits only: int("\u0661") is 1 too


def is_model_name(name: str) -> bool:
    """Directory-safe and unable to escape the repository (whole string: no trailing newline).

    One path segment that cannot start with a dot, so never ``.`` or ``..``; dots inside
    (``model..1``) are a plain name, which Triton serves too."""
    return _NAME.fullmatch(name) is not None


def check_model_name(name: str) -> str:
    """Reject names that could escape the repository or are not directory-safe."""
    if not is_model_name(name):
        raise InvalidInput(f"invalid model name {name[:64]!r}")
    return name


def is_version(text: str) -> bool:
    """A version number as written in a path or a URL: 1 to 18 ASCII digits."""
    return _VERSION.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class ModelSource:
    """What is needed to load one model: its config and the files of the chosen versions."""

    name: str
    directory: Path
    config: ModelConfig
    version_paths: dict[int, Path]


class LocalRepository:
    """A model repository directory on this machine."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_model_name(p.name))

    def model_dir(self, name: str) -> Path:
        path = self.root / check_model_name(name)
        if not path.is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository")
        return path

    # Hooks for repositories that fetch files on demand (``gateway.repository.edge``); a local
    # directory has everything already.
    async def fetch(self, name: str) -> None:
        """Make the model's files present locally before :meth:`source` reads them."""

    def on_demand(self, name: str) -> bool:
        """Whether a request for a model not loaded yet should load it first."""
        return False

    async def startup_names(self) -> list[str]:
        """The models to load when the server starts (unless ``load_models`` names them)."""
        return self.model_names()

    def note(self, name: str) -> str:
        """A word on a model that is not loaded, for the repository index."""
        return ""

    def source(self, name: str, config: ModelConfig | None = None) -> ModelSource:
        """Read a model's config (unless given) and locate its selected version files."""
        directory = self.model_dir(name)
        if config is None:
            config = load_config(directory)
        return locate_versions(directory, config)


MAX_LABEL_FILE_BYTES = 16 << 20


def read_labels(directory: Path, config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each output's class labels from its ``label_filename`` (one label a line, class ``i`` on
    line ``i``), read at load time for the classification extension."""
    labels: dict[str, tuple[str, ...]] = {}
    for tensor in config.outputs:
        if not tensor.label_filename:
            continue
        path = directory / tensor.label_filename
        where = f"model '{config.name}' output '{tensor.name}'"
        try:
            if path.stat().st_size > MAX_LABEL_FILE_BYTES:
                raise ModelLoadError(f"{where}: {tensor.label_filename} is over 16 MiB")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise ModelLoadError(
                f"{where}: label_filename {tensor.label_filename!r} cannot be read: {why}"
            ) from None
        labels[tensor.name] = tuple(text.splitlines())
    return labels


def locate_versions(directory: Path, config: ModelConfig) -> ModelSource:
    """Select the version directories the config's policy asks for and find their model files."""
    available = [int(p.name) for p in directory.iterdir() if p.is_dir() and is_version(p.name)]
    chosen = config.version_policy.select(available)
    if not chosen:
        raise ModelLoadError(
            f"model '{config.name}': no version directory matches the version policy "
            f"(found {sorted(available) or 'none'})"
        )
    paths: dict[int, Path] = {}
    for version in chosen:
        if config.is_ensemble:  # its version directory holds nothing: the steps are models
            paths[version] = directory / str(version)
            continue
        path = directory / str(version) / config.default_model_filename
        if not path.is_file():
            raise ModelLoadError(
                f"model '{config.name}' version {version}: "
                f"{version}/{config.default_model_filename} is missing"
            )
        paths[version] = path
    return ModelSource(config.name, directory, config, paths)
