"""Triton Inference Server model repository from a bundle (``favor-export --targets triton``).

    configs.py        each model's config.pbtxt contents, from the bundle manifest
    pbtxt.py          protobuf text format writer
    repository.py     the repository layout, written atomically (``write_repository``)
    python_models.py  the Python-backend models (stages on ONNX Runtime, step-wise decoder, BLS pipeline)
    server.py         starting a real ``tritonserver`` (the nvidia-pytriton wheel's) on a repository
"""
