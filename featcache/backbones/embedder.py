"""The :class:`Embedder` protocol: what every engine's built backbone offers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from featcache.backbones.identity import BackboneIdentity
from featcache.preprocessing import Preprocessing

if TYPE_CHECKING:
    import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """A built backbone, whatever runs it: N×H×W×3 uint8 pixels in, N×D float32 embeddings out.

    ``pixels`` come from :func:`featcache.images.load_pixels` at ``preprocessing.size``;
    ``engine`` names what runs the network (``openvino`` or ``torch``).
    """

    identity: BackboneIdentity
    engine: str

    @property
    def preprocessing(self) -> Preprocessing: ...

    @property
    def feature_dim(self) -> int: ...

    def embed(self, pixels: np.ndarray) -> np.ndarray: ...

    def embed_maps(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`embed`, and the N×C×h×w float32 maps of ``identity.maps`` from the same pass."""
        ...


class Described:
    """The parts of an :class:`Embedder` that its identity alone determines."""

    identity: BackboneIdentity

    @property
    def preprocessing(self) -> Preprocessing:
        return self.identity.preprocessing

    @property
    def feature_dim(self) -> int:
        return self.identity.feature_dim
