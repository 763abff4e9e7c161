"""The bridge between ONNX files and editable PyTorch graphs.

Knows ONNX and torch, nothing about repair, and depends on nothing in the ``onnxrepair`` package: read + check + inventory
(:mod:`converters.load`, :func:`read`), ONNX -> ``torch.fx.GraphModule`` (:func:`convert`, through
:mod:`converters.to_torch` with extra op converters in :mod:`converters.ops` and ONNX-level fixes in
:mod:`converters.onnx_passes`), GraphModule -> ONNX (:func:`export_like`, :mod:`converters.export`), its own
errors (:mod:`converters.errors`) and atomic writer (:mod:`converters.io`).

Importing this package loads onnx and numpy only; torch and onnx2torch load when a conversion or export runs.
"""

from .errors import ConverterError, ConverterUsageError, ModelError, UnsupportedOpsError  # noqa: F401
from .load import LoadedModel, OpKey, TensorSpec, load_model, read, weight_count  # noqa: F401
from .convert import ConvertedModel, OnnxTail, convert, export_like  # noqa: F401,E402
from .io import save_model_atomic  # noqa: F401
