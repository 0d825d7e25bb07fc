"""fewstep.export: a Plan + model as one engine (ONNX, TensorRT) and a Triton model repository (DESIGN §7).

Importing this package does not import onnx, onnxruntime or tensorrt; each is imported where used.
"""

from .onnx import ExportError, export_onnx, export_step_onnx, export_teacher, read_metadata
from .tensorrt import build_tensorrt, ort_tensorrt_options
from .triton_repo import write_triton_repo
from .verify import VerifyError, verify

__all__ = ["ExportError", "VerifyError", "build_tensorrt", "export_onnx", "export_step_onnx", "export_teacher",
           "ort_tensorrt_options", "read_metadata", "verify", "write_triton_repo"]
