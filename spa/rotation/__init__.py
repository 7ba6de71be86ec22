"""Residual-stream rotation (SliceGPT, one rotation for the whole stream): ``spa.rotation.stage``."""
