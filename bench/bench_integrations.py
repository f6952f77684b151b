"""Peak memory of TRL's and verl's loss paths with and without our adapters (kernels/integrations/), at Qwen's
vocabulary (V = 151,936).

    python bench/bench_integrations.py [--cases trl-grpo,trl-dpo,verl-actor] [--seqs 4] [--tokens 256] [--hidden 64]

Each case runs one forward + backward of the trainer's own loss function on a 1-layer random Qwen2 with the full
vocabulary, in a fresh child process per (case, path):
- trl-grpo: `GRPOTrainer._compute_loss` (TRL 1.16's own chunked head; its chunk is 32,768 tokens, so at these sizes
  it holds the [N, V] logits) vs `FusedGRPOTrainer._compute_loss` (grpo_loss from hidden states). loss_type dapo,
  beta 0.04 (reference log-probs given), old log-probs given.
- trl-dpo: `DPOTrainer._compute_loss` vs `FusedDPOTrainer._compute_loss`, reference model forward included.
- verl-actor: verl 0.9's FSDPEngineWithLMHead log-prob + entropy path (prepare inputs, model, prepare outputs) with
  `use_fused_kernels=False` (its default: full logits) vs True with `kernels.integrations.verl.install_head`.
Peak memory is above what the process held just before the call: on CUDA `torch.cuda.max_memory_allocated`, on CPU
the resident set size sampled every millisecond by a thread (so a peak shorter than that can be missed). A case
whose library is not importable is skipped with its reason. Rows go to bench/results/integrations.csv.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a plain checkout: import `kernels` and `tests.tiny_lm`

import torch  # noqa: E402

from kernels._bench import Results  # noqa: E402

VOCAB = 151_936
CASES = ("trl-grpo", "trl-dpo", "verl-actor")


# ------------------------------------------------------------------------------------------- measurement
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096  # resident pages


def measure(fn) -> tuple[float, float]:
    """(peak extra MiB, ms) of one call of fn()."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, 1000 * (time.perf_counter() - t0)
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():  # the matmuls release the GIL, so this thread keeps sampling while they run
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    fn()
    ms = 1000 * (time.perf_counter() - t0)
    done.set()
    sampler.join()
    return (max(peak[0], _rss_bytes()) - base) / 2**20, ms


# ------------------------------------------------------------------------------------------------- cases
def _model_dir(tmp: Path, hidden: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.tiny_lm import char_tokenizer

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0,
                         eos_token_id=1)
    Qwen2ForCausalLM(config).save_pretrained(tmp)
    char_tokenizer().save_pretrained(tmp)
    return tmp


def _trl_grpo(fused: bool, model_dir: Path, seqs: int, tokens: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from kernels.integrations.trl import FusedGRPOTrainer
    from tests.tiny_lm import char_tokenizer

    args = GRPOConfig(output_dir=str(model_dir / "out"), per_device_train_batch_size=seqs, num_generations=seqs,
                      max_completion_length=tokens, beta=0.04, use_bias_correction_kl=False, report_to="none",
                      use_cpu=not torch.cuda.is_available(), bf16=False)
    cls = FusedGRPOTrainer if fused else GRPOTrainer
    trainer = cls(model=str(model_dir), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                  train_dataset=Dataset.from_dict({"prompt": ["ab"] * seqs}), processing_class=char_tokenizer())
    dev = trainer.accelerator.device
    g = torch.Generator().manual_seed(0)
    inputs = {"prompt_ids": torch.randint(3, 32, (seqs, 16), generator=g), "prompt_mask": torch.ones(seqs, 16),
              "completion_ids": torch.randint(3, VOCAB, (seqs, tokens), generator=g),
              "completion_mask": torch.ones(seqs, tokens), "advantages": torch.randn(seqs, generator=g),
              "old_per_token_logps": -torch.rand(seqs, tokens, generator=g) - 11.0,
              "ref_per_token_logps": -torch.rand(seqs, tokens, generator=g) - 11.0,
              "num_items_in_batch": torch.tensor(float(seqs * tokens))}
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this call skips
    return lambda: trainer._compute_loss(trainer.model, inputs).backward()


def _trl_dpo(fused: bool, model_dir: Path, seqs: int, tokens: int):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from kernels.integrations.trl import FusedDPOTrainer
    from tests.tiny_lm import char_tokenizer

    args = DPOConfig(output_dir=str(model_dir / "out"), per_device_train_batch_size=seqs, report_to="none",
                     use_cpu=not torch.cuda.is_available(), bf16=False)
    dataset = Dataset.from_dict({"prompt": ["ab"] * 2, "chosen": ["a"] * 2, "rejected": ["b"] * 2})
    cls = FusedDPOTrainer if fused else DPOTrainer
    trainer = cls(model=str(model_dir), args=args, train_dataset=dataset, processing_class=char_tokenizer())
    dev = trainer.accelerator.device
    n = 2 * seqs  # seqs pairs: chosen rows, then rejected rows
    g = torch.Generator().manual_seed(0)
    completion_mask = torch.zeros(n, 16 + tokens, dtype=torch.long)
    completion_mask[:, 16:] = 1
    inputs = {"input_ids": torch.randint(3, VOCAB, (n, 16 + tokens), generator=g),
              "attention_mask": torch.ones(n, 16 + tokens, dtype=torch.long), "completion_mask": completion_mask}
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    trainer.model.train()
    return lambda: trainer._compute_loss(trainer.model, inputs, False).backward()


def _verl_actor(fused: bool, model_dir: Path, seqs: int, tokens: int):
    from transformers import AutoModelForCausalLM
    from verl.utils import tensordict_utils as tu
    from verl.utils import torch_functional as verl_F
    from verl.workers.config import FSDPEngineConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from kernels.integrations.verl import install_head

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(dev)
    if fused:
        install_head(model)
    engine = object.__new__(FSDPEngineWithLMHead)  # only the log-prob path's attributes (see the verl test)
    engine.module, engine.engine_config = model, FSDPEngineConfig()
    engine.pad_to_length, engine.use_ulysses_sp = False, False
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, VOCAB, (16 + tokens,), generator=g).to(dev) for _ in range(seqs)]
    pos = [torch.arange(16 + tokens, device=dev) for _ in range(seqs)]
    batch = tu.get_tensordict({"input_ids": tu.nested_tensor_from_tensor_list(ids),
                               "position_ids": tu.nested_tensor_from_tensor_list(pos)},
                              {"temperature": 1.0, "use_remove_padding": True, "use_fused_kernels": fused,
                               "calculate_entropy": True})

    def step():
        inputs, output_args = engine.prepare_model_inputs(batch)
        out = engine.prepare_model_outputs(model(**inputs, use_cache=False), output_args, batch, None)
        (out["log_probs"].values().mean() - 0.01 * out["entropy"].values().mean()).backward()

    return step


BUILDERS = {"trl-grpo": _trl_grpo, "trl-dpo": _trl_dpo, "verl-actor": _verl_actor}


def child(case: str, fused: bool, seqs: int, tokens: int, hidden: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fn = BUILDERS[case](fused, _model_dir(Path(tmp), hidden), seqs, tokens)
        mib, ms = measure(fn)
    return {"peak_extra_mib": mib, "ms": ms}


# -------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--seqs", type=int, default=4, help="sequences (GRPO completions, DPO pairs, verl samples)")
    p.add_argument("--tokens", type=int, default=256, help="scored tokens per sequence (after a 16-token prompt)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--child", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], a.child[1] == "fused", a.seqs, a.tokens, a.hidden)))
        return
    results = Results("integrations", Path(a.out))
    for case in a.cases.split(","):
        for path in ("own", "fused"):
            cmd = [sys.executable, __file__, "--child", case, path, "--seqs", str(a.seqs), "--tokens", str(a.tokens),
                   "--hidden", str(a.hidden)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{case} {path}: skipped ({(proc.stderr.strip().splitlines() or ['no output'])[-1]})")
                continue
            r = json.loads(line[0][len("RESULT "):])
            print(f"{case:10s} {path:5s} peak extra {r['peak_extra_mib']:9.1f} MiB  {r['ms']:9.1f} ms")
            shape = f"{case} B={a.seqs} T={a.tokens} H={a.hidden} V={VOCAB}"
            results.add("trainer" if path == "own" else "fused-adapter", "fwd+bwd", shape, "fp32",
                        (r["ms"],) * 3, extra_gib=r["peak_extra_mib"] / 1024)
    results.print_table()
    results.write()


if __name__ == "__main__":
    main()
