"""Trained models for other runtimes: `reid.export.onnx.export_onnx` writes a checkpoint's model as an
ONNX graph with the checkpoint's record in its metadata (`reid.export.onnx_format`), which
`Embedder.from_checkpoint` loads wherever it loads the checkpoint."""
