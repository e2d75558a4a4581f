"""A local OpenAI-compatible server: `ondevice serve MODEL` or, from Python,

    from ondevice.server import create_server
    server = create_server(ondevice.load("model.gguf"), port=8080)
    server.serve_forever()

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and the browser chat
page (apps/web) at /.
"""

from ondevice.server.app import OndeviceServer, create_server
from ondevice.server.engine import Engine, Job
from ondevice.server.protocol import Limits, RequestError

__all__ = ["Engine", "Job", "Limits", "OndeviceServer", "RequestError", "create_server"]
