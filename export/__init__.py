"""Compile a family for fast serving: ONNX (checked through ONNX Runtime) and TensorRT engines.

    export.onnx.export_family(model_dir, out_dir, cfg)   -> manifest   (flash export onnx)
    export.tensorrt.build_engines(onnx_dir, out_dir, cfg) -> manifest  (flash export tensorrt; unverified)
    export.runtime.register(service.backends.BACKENDS)                 ("onnxruntime", "tensorrt")

docs/export.md describes the graphs, the manifests and what has run where.
"""
