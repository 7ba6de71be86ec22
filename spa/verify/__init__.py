"""Verification: the exactness oracle that tests every prunable group (``oracle``), and the commands
that compare two models' outputs (``check``) and time them in onnxruntime (``bench``)."""
