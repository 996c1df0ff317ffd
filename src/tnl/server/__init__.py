"""The HTTP server: the seed tutorial's POST /, an OpenAI-compatible API, operations routes.

    from tnl.server import ServerConfig, serve, build_app
    serve(ServerConfig(model="OpenNLPLab/TransNormerLLM-7B", port=6006))

`serve` and `build_app` are imported lazily, so `tnl --help` (which needs only the flags in
tnl.server.config) does not pay for FastAPI and torch.
"""
from tnl.server.config import ServerConfig, add_server_args

__all__ = ["ServerConfig", "add_server_args", "build_app", "serve"]


def __getattr__(name):
    if name == "serve":
        from tnl.server.launch import serve
        return serve
    if name == "build_app":
        from tnl.server.app import build_app
        return build_app
    raise AttributeError(name)
