"""Surgery: the planned channels removed from the model (``slicing``: constants sliced, size
parameters rewritten, onnx-graphsurgeon) and the result validated before anything is written
(``validate``: onnx.checker, onnxruntime at every size the model accepts)."""
