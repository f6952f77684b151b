"""The `toy` stage: build the embedded toy world into the stage directory (rank 0 builds, the others wait).

Outputs: `data/{train,test,sft}.parquet` and `hf/` (tokenizer, image processor, a random tiny Qwen2.5-VL), so
later stages refer to it as `init = "<stage>"` and `train = "<stage>:data/sft.parquet"`.
"""

from engine.config_stages import ToyStageConfig
from engine.dist import barrier
from engine.log import log0
from engine.stages import StageContext
from engine.toy import build_toy_world


def run(cfg: ToyStageConfig, ctx: StageContext) -> None:
    if ctx.dist.is_main:
        paths = build_toy_world(ctx.stage_dir, seed=cfg.seed, num_train=cfg.num_train, num_test=cfg.num_test,
                                format_share=cfg.format_share, image_size=cfg.image_size,
                                hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, vision_depth=cfg.vision_depth)
        log0("toy world: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    barrier()  # the other ranks read these files in the next stage
