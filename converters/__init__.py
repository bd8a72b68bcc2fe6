"""Converters: trained models from PyTorch, TorchScript, torch.export, ONNX, TensorFlow and Keras to OpenVINO IR,
verified against the source and carrying their run settings (see :mod:`volinfer.model.settings`).

    from converters import convert
    result = convert("model.onnx", "unet.xml", tile=128, activation="softmax", labels=["background", "tumour"])
    print(result.path, result.parity)
"""

from .convert import ConversionResult, ParityReport, convert, probe_size_multiple
from .offline import no_telemetry
from .settings import ConvertSettings
from .sources import kind_of

no_telemetry()  # before any conversion: see converters.offline

__all__ = ["convert", "ConversionResult", "ParityReport", "probe_size_multiple", "kind_of", "ConvertSettings"]
