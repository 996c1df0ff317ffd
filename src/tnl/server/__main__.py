"""`python -m tnl.server [flags]`: the same server and flags as `tnl serve`."""
import argparse
import sys

from tnl.server.config import ServerConfig, add_server_args


def main(argv: list[str] | None = None) -> int:
    parser = add_server_args(argparse.ArgumentParser(prog="python -m tnl.server",
                                                     description="Serve a TransNormerLLM model over HTTP."))
    parser.add_argument("--source", default="modelscope", choices=["modelscope", "huggingface", "ms", "hf"],
                        help="hub to download from when --model is a hub id not in the cache")
    config = ServerConfig.from_args(parser.parse_args(argv))
    from tnl.server.launch import serve
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
