"""fewstep: few-step diffusion sampling at the latency floor.

Sub-packages: ``fewstep.runtime`` (Plan, executor, denoisers, solvers, noise),
``fewstep.training`` (teachers, metrics, fitting, distillation), ``fewstep.kernels``
(fused Triton updates), ``fewstep.export`` (ONNX / TensorRT engines).
"""

__version__ = "0.1.0"
