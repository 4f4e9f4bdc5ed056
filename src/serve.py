"""Serve a checkpoint over HTTP: ``python src/serve.py ckpt=RUN`` (OpenAI API, page at /)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

import hydra
from omegaconf import DictConfig

from nanoforge import cli, hydra_setup

hydra_setup.setup()


@hydra.main(version_base="1.3", config_path="../configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    try:  # here: `--help` answers without loading torch
        from nanoforge.serving_app import serve
    except ImportError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        from nanoforge.errors import fail

        fail(f"serve.py needs FastAPI and uvicorn ({e.name} is missing): pip install -e '.[serve]'")

    hydra_setup.settle_imports()  # the import-time objects: no garbage collection walks them

    hydra_setup.run(serve, cfg)


if __name__ == "__main__":
    sys.argv = cli.check_command_line(sys.argv, "serve")  # typos: one line, exit 2
    main()
