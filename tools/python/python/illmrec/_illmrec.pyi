"""Type hints of the illmrec extension module (tools/python/src/lib.rs)."""

from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

__version__: str

class IllmrecError(RuntimeError):
    """An error of the runtime (bad bundle, unknown item id, empty history, ...)."""

class Recommender:
    def __init__(
        self,
        bundle: str | PathLike[str],
        *,
        model: str | PathLike[str] | None = None,
        threads: int | None = None,
        n_gpu_layers: int | None = None,
        mmap: bool = True,
        mlock: bool = False,
        ctx: int = 2048,
        kv_f32: bool = False,
        flash_attn: Literal["auto", "on", "off"] = "on",
        max_history: int = 10,
        missing_image: Literal["text", "title"] = "text",
        description_tokens: int = 64,
        cache_dir: str | PathLike[str] | None = None,
        prefix_cache: bool = True,
        verbose: bool = False,
    ) -> None: ...
    @property
    def n_embd(self) -> int: ...
    @property
    def modalities(self) -> list[str]: ...
    @property
    def trained(self) -> bool: ...
    @property
    def item_ids(self) -> npt.NDArray[np.uint64]: ...
    @property
    def warnings(self) -> list[str]: ...
    def recommend(
        self,
        history: Sequence[int],
        top_k: int = 10,
        candidates: Sequence[int] | None = None,
        include_seen: bool = False,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32]]: ...
    def score_batch(
        self,
        users: Iterable[Mapping[str, Any]],
        top_k: int = 10,
        include_seen: bool = False,
        errors: Literal["raise", "return"] = "raise",
    ) -> list[dict[str, Any]]: ...
    @overload
    def embed(
        self, histories: Sequence[Sequence[int]], user_vectors: Literal[False] = False
    ) -> npt.NDArray[np.float32]: ...
    @overload
    def embed(
        self, histories: Sequence[Sequence[int]], user_vectors: Literal[True]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
