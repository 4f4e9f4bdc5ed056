"""Encode a corpus into its token file: ``python src/prepare.py data=pycode tokenizer=bpe``.

Training does this itself when the file is missing (Lightning's ``prepare_data``); this entry
point does it ahead of time and says what it made (see configs/prepare.yaml).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without install

import hydra
from omegaconf import DictConfig

from nanoforge import cli, hydra_setup

hydra_setup.setup()


def prepare(cfg: DictConfig) -> dict:
    import time

    from nanoforge.training import build_object

    t0 = time.perf_counter()
    datamodule = build_object(cfg.data)
    shard = datamodule.shard()
    h = shard.header
    where = shard.path if shard.path is not None else "memory (data.cache_dir=null)"
    print(
        f"{h['source']}: {h['n_bytes']:,} bytes -> {h['n_tokens']:,} {h['tokenizer']['kind']} "
        f"tokens (vocab {h['vocab_size']:,}, {h['dtype']}; {h['n_train']:,} train / "
        f"{h['n_tokens'] - h['n_train']:,} val) in {time.perf_counter() - t0:.1f} s\n{where}"
    )
    return h


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare")
def main(cfg: DictConfig) -> None:
    hydra_setup.run(prepare, cfg)


if __name__ == "__main__":
    sys.argv = cli.check_command_line(sys.argv, "prepare")  # typos: one line, exit 2
    main()
