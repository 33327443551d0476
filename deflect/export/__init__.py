"""Deployment: a finished run as one ONNX file that ONNX Runtime runs without PyTorch.

* :mod:`deflect.export.graph`: what is exported (the raw image in, the band handling and the
  model with its adapter merged where the method allows, the task's outputs out);
* :mod:`deflect.export.onnx`: the export itself (``torch.export`` + ``torch.onnx``), its
  metadata, its check against PyTorch and the ``export/README.md`` beside the file;
* :mod:`deflect.export.runtime`: the file run by ONNX Runtime behind ``scripts/predict.py``'s
  scene tiler (``--onnx``).

Needs the ``export`` extra (``pip install -e '.[export]'``: onnx, onnxscript, onnxruntime).
"""

from deflect.export.onnx import ExportError, ExportResult, export_model, export_run, read_metadata

__all__ = ["ExportError", "ExportResult", "export_model", "export_run", "read_metadata"]
