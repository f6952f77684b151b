"""The `toy` stage: build the embedded toy world into the stage directory (rank 0 builds, the others wait).

Outputs: `data/{train,test,sft}.parquet` and `hf/` (tokenizer, image processor, a random tiny Qwen2.5-VL), so
later stages refer to it as `init = "<stage>"` and `train = "<stage>:data/sft.parquet"`.
"""

from engine.dist import on_main
from engine.log import log0
from engine.stages import StageContext
from engine.stages.config import ToyStageConfig
from engine.toy import build_toy_world


def run(cfg: ToyStageConfig, ctx: StageContext) -> None:
    # The other ranks wait for rank 0 (they read these files in the next stage) and stop with its error, if any.
    paths = on_main(lambda: build_toy_world(ctx.stage_dir, cfg))  # the stage config is a ToySpec
    log0("toy world: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
