"""Serving supir-rt: a Ray Serve application (`supir_rt.serve.ray_app`), a Triton model repository and a
PyTriton entry point (`supir_rt.serve.triton`), over one framework-free core:

* `supir_rt.serve.protocol`: request settings and image checks, PNG encoding, `RequestError`;
* `supir_rt.serve.worker`: `RestoreWorker`, a loaded `Restorer` answering lists of requests (batched).

Ray, FastAPI and PyTriton are imported only by the modules that need them (``pip install 'supir-rt[serve]'``).
"""

from supir_rt.serve.protocol import Limits, RequestError, decode_image, encode_png, parse_settings
from supir_rt.serve.worker import Job, Outcome, RestoreWorker, RuntimeOptions

__all__ = ["Job", "Limits", "Outcome", "RequestError", "RestoreWorker", "RuntimeOptions", "decode_image",
           "encode_png", "parse_settings"]
