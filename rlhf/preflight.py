"""Checks that need no training, run before the first stage: fail in seconds, not after SFT."""

from __future__ import annotations

from pathlib import Path

from .config import PipelineConfig
from .data import DatasetError, data_files_list
from .modeling import check_model_source
from .tracking import check_reachable, resolve_uri


def preflight(cfg: PipelineConfig) -> str:
    """Model paths exist, local dataset files exist, the tracking server answers. Returns the tracking URI."""
    for key, value in (("model.pretrained", cfg.model.pretrained), ("model.tokenizer", cfg.model.tokenizer)):
        if value:
            check_model_source(value, key)
    if cfg.data.source == "hub":
        missing = [f for f in data_files_list(cfg.data.data_files) if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists()]
        if missing:
            raise DatasetError(f"data.data_files names missing file(s) {missing}. Fix: point data.data_files at existing files.")
    uri = resolve_uri(cfg.tracking, Path(cfg.paths.root))
    check_reachable(uri, cfg.tracking.connect_timeout_s)
    return uri
