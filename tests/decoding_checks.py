"""Checks of a model's decoding paths shared by test_model.py (MLA), test_dsa.py (V3.2's indexer on
the cache) and test_mhc.py (hyper-connections): that the cached paths compute what one forward
without a cache does (a prefill, the expanded path, which writes the cache; a chunk on that past
and single tokens, the absorbed path on the cached latents; the MTP module on its own cache
layer), and the engine's greedy tokens over batches of mixed lengths with prefix-cache hits
against `reference_greedy`, the argmax of a full no-cache forward per token (test_engine.py and
test_dense.py use it too); `lookup_model`, a tiny model that writes a given script greedily
(test_serve.py, test_structured.py); and `fed_in_chunks`, a streaming parser's events for a text
that arrives in random pieces (test_serve_tools.py, test_dsml.py)."""

import random

import torch

from nanoseek import LLM, SamplingParams
from nanoseek.config import preset
from nanoseek.model.attention import ContiguousCache
from nanoseek.model.transformer import Transformer

PREFIX = [11, 12, 13, 14, 15, 16, 17, 18]  # two full blocks of 4: a prefix the later prompts share
PROMPTS = [[7, 8, 9], PREFIX + [40], [100, 101, 102, 103, 104, 105], PREFIX + [41, 42, 43, 44, 45], [5, 6]]


@torch.no_grad()
def assert_cached_decoding_matches(model, ids: torch.Tensor, prefill: int, chunk_end: int, mtp_split: int | None = None,
                                   max_len: int = 32) -> None:
    """ids (B, T): positions [0, prefill) as a prefill, [prefill, chunk_end) as one chunk, the rest one
    token at a time, on a ContiguousCache; their logits equal the no-cache forward's at every
    position (to 1e-5). mtp_split: also the MTP module's depth-0 logits, run on the cache in two
    chunks split there, against its no-cache forward."""
    B, T = ids.shape
    cache = ContiguousCache(model.config, batch_size=B, max_len=max_len)
    full = model(ids)
    pieces = [model(ids[:, :prefill], cache=cache).logits]
    pieces.append(model(ids[:, prefill:chunk_end], positions=torch.arange(prefill, chunk_end).expand(B, -1),
                        cache=cache).logits)
    for t in range(chunk_end, T):
        pieces.append(model(ids[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, atol=1e-5, rtol=0)
    if mtp_split is not None:  # depth 0 at position i reads token i+1: positions 0..T-2
        positions = torch.arange(T - 1).expand(B, -1)
        _, expected = model.mtp_forward(0, full.hidden[:, :-1], ids[:, 1:], positions)
        _, first = model.mtp_forward(0, full.hidden[:, :mtp_split], ids[:, 1:mtp_split + 1],
                                     positions[:, :mtp_split], cache=cache)
        _, rest = model.mtp_forward(0, full.hidden[:, mtp_split:-1], ids[:, mtp_split + 1:],
                                    positions[:, mtp_split:], cache=cache)
        torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, atol=1e-5, rtol=0)


def engine_greedy(path, n: int, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    """The engine's greedy tokens (n per prompt, block size 4) for the prompts: the first three in
    one batch of three lengths, the others in a second batch, whose first prompt starts from
    prompt 1's cached blocks (asserted)."""
    greedy = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm = LLM(str(path), block_size=4)
    first = llm.generate(prompts[:3], greedy)
    rest = llm.generate(prompts[3:], greedy)
    assert rest[0].num_cached_tokens == 8 and llm.stats()["prefix_cache_hit_tokens"] >= 8
    return [o.outputs[0].token_ids for o in first + rest]


@torch.no_grad()
@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Argmax continuation with a full forward (expanded attention, no cache) per token, on the
    model's device."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax()))
    return ids[len(prompt):]


def lookup_model(vocab_size: int, chain: list[int], config=None) -> Transformer:
    """A tiny model whose greedy continuation of chain[0] is chain[1:].

    With every attention and MLP output projection zeroed, the residual stream is just the token
    embedding, so the logits depend on the current token only: setting lm_head row `b` to the
    (normalised) embedding of `a` makes `b` the argmax after `a`. Chaining the script's tokens turns
    the model into a lookup table that writes the script, through the real engine and cache.
    `config`: the model's shape (default: the tiny preset)."""
    assert len(set(chain[:-1])) == len(chain) - 1, "each token must have one successor"
    torch.manual_seed(0)
    model = Transformer(config or preset("tiny", vocab_size=vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b] = 10 * emb[a] / emb[a].norm()
    return model


def fed_in_chunks(parser, text: str, seed: int, longest: int) -> list[tuple]:
    """The events of `parser` (a tool-call parser: feed / finish) for `text` fed in random pieces of
    1 to `longest` characters, as a stream may cut it, then finished."""
    rng, events, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, longest)
        events += parser.feed(text[i:i + n])
        i += n
    return events + parser.finish()
