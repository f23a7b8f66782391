"""Names shared by the package and its command line; importing this module imports nothing heavy."""

ENCODINGS = ("float32", "float16", "int8")
UPLOADS = ("activations", "raw", "auto")
DEMO_LAYERS = ("stem", "layer1", "layer2")
IMAGE_FORMATS = ("png", "jpeg")  # raw uploads as image files, decoded and preprocessed by the server
COMPRESSIONS = ("none", "zstd")  # entropy coding of tensor bodies (image files are compressed already)
CLOUD_RUNTIMES = ("torch", "onnxruntime")  # what runs a served split's parts (serve-cloud --runtime)

HEADER_TIMEOUT_ENV = "EARLIN_HEADER_TIMEOUT"
"""Where uvicorn's worker processes read the request-header deadline (``earlin serve-cloud --workers``)."""
