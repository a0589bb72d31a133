"""Checks that need no training, run before the first stage: fail in seconds, not after SFT."""

from __future__ import annotations

import os
from pathlib import Path

from .config import PipelineConfig
from .data import DatasetError, data_files_list
from .model_paths import check_model_source
from .settings import ConfigError
from .tracking import check_reachable, resolve_uri


def check_root(root: str) -> None:
    """``paths.root`` exists (or can be made) and takes files."""
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"paths.root={root!r} cannot be used: {e.strerror or e} ({type(e).__name__}). It holds every stage's "
            f"outputs, "
            f"Prefect's results and the MLflow store. Fix: pass paths.root=<a writable folder> or set RLHF_HOME."
        ) from e


def preflight(cfg: PipelineConfig) -> str:
    """paths.root takes files, model paths hold a model (and a tokenizer), local dataset files exist, the tracking
    server answers. Returns the tracking URI."""
    check_root(cfg.paths.root)
    if cfg.model.pretrained:
        check_model_source(cfg.model.pretrained, "model.pretrained")
    if cfg.model.pretrained or cfg.model.tokenizer:  # null tokenizer: the pretrained folder's own
        key = "model.tokenizer" if cfg.model.tokenizer else "model.pretrained"
        check_model_source(cfg.model.tokenizer or cfg.model.pretrained, key, needs="tokenizer")
    if cfg.data.source == "hub":
        missing = [
            f
            for f in data_files_list(cfg.data.data_files)
            if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists()
        ]
        if missing:
            raise DatasetError(
                f"data.data_files names missing file(s) {missing}. Fix: point data.data_files at existing files."
            )
    uri = resolve_uri(cfg.tracking, Path(cfg.paths.root))
    check_reachable(uri, cfg.tracking.connect_timeout_s)
    return uri
