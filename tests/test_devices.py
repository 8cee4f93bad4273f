"""The same checks on every device: CPU always, CUDA when there is a GPU (`pytest -m cuda` runs only
the CUDA cases; `benchmarks/gpu_check.sh` does that on a GPU machine).

On CUDA the defaults change in the ways a GPU user expects, and these tests pin them: bf16 autocast
for training (fp32 weights and optimizer state), bf16 weights and latent cache for inference, and
the MoE experts as grouped GEMMs. Every CLI stage runs end to end with `device=` set.
"""

import contextlib
import json
import random

import pytest
import torch

import nanoseek
from nanoseek import LLM, SamplingParams
from nanoseek.checkpoint import save_model
from nanoseek.cli import main as cli_main
from nanoseek.config import preset
from nanoseek.data.tasks import get_task, r1zero_completion, r1zero_prompt
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.sft import tokenize_prompt_completion
from decoding_checks import reference_greedy
from test_distill import memorise

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(device, seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", **overrides)).to(device)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


# the architecture variants beside V3: V3.2's sparse attention (top 8 of up to 24 tokens) and V4's
# hyper-connections (2 residual streams)
VARIANTS = {"v3": {}, "v32": dict(index_topk=8, index_head_dim=16, index_n_heads=4), "mhc": dict(hc_mult=2)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_backward_match_the_cpu_in_fp32_and_bf16_autocast(device, variant):
    cpu = tiny_model("cpu", **VARIANTS[variant]).train()
    model = tiny_model(device, **VARIANTS[variant]).train()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, dims=1)
    reference = cpu(ids, labels=labels)
    (reference.loss + reference.mtp_loss).backward()
    out = model(ids.to(device), labels=labels.to(device))
    (out.loss + out.mtp_loss).backward()
    assert abs(out.loss.item() - reference.loss.item()) < 1e-4
    assert abs(out.mtp_loss.item() - reference.mtp_loss.item()) < 1e-4
    for (name, p), q in zip(model.named_parameters(), cpu.parameters()):
        if q.grad is not None and q.grad.norm() > 0:
            assert relative_error(p.grad.cpu(), q.grad) < 1e-3, name
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        bf16 = model(ids.to(device), labels=labels.to(device))
    assert bf16.logits.dtype == torch.bfloat16
    assert abs(bf16.loss.item() - reference.loss.item()) < 0.05


@pytest.mark.parametrize("model", ["v3", "v4"])
def test_grouped_gemm_experts_equal_the_expert_loop(device, model):
    """The grouped form (default on CUDA in bf16) and the loop (default elsewhere) compute the same
    MoE, in value and gradient, with uneven routing (some experts get no token); V4's too
    (sqrtsoftplus routing, the experts' SwiGLU clamped at a swiglu_limit the inputs reach)."""
    torch.manual_seed(0)
    config = (preset("tiny", n_routed_experts=16, num_experts_per_tok=3, n_group=1, topk_group=1) if model == "v3"
              else preset("v4-tiny", n_routed_experts=16, num_experts_per_tok=3, swiglu_limit=0.3))
    moe = MoE(config).to(device)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 5, 64, device=device, requires_grad=True)
    # the CUDA kernels are bf16 ones: compare there under autocast, at bf16's precision
    cuda = torch.device(device).type == "cuda"
    def precision():  # a fresh context each time: an autocast object is not re-entrant
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    tolerance = 2e-2 if cuda else 1e-4
    results = []
    for grouped in (False, True):
        moe.grouped_gemm = grouped
        with precision():
            y = moe(x)
        grads = torch.autograd.grad(y.float().square().sum(), [x, *moe.parameters()], allow_unused=True)
        results.append((y, grads))
    (y_loop, g_loop), (y_grouped, g_grouped) = results
    assert relative_error(y_grouped, y_loop) < tolerance
    for a, b in zip(g_grouped, g_loop):
        if b is not None and b.norm() > 0:
            assert relative_error(a, b) < 2 * tolerance
    calls = []  # which form the default picks: grouped on CUDA in bf16, the loop elsewhere
    moe.grouped_gemm, grouped = None, moe._dispatch_grouped
    moe._dispatch_grouped = lambda *a: calls.append(1) or grouped(*a)
    with precision():
        moe(x)
    assert bool(calls) == cuda


def test_stacked_experts_compute_the_same_moe(device):
    """MoE.stack_experts (what LLM does to a checkpoint it loads on a GPU): the experts' weights
    become views of two stacked tensors, which the grouped GEMMs read in place; same output, same
    state-dict keys and values."""
    torch.manual_seed(0)
    moe = MoE(preset("tiny", n_routed_experts=16, num_experts_per_tok=3, n_group=1, topk_group=1)).to(device).eval()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        moe = moe.to(torch.bfloat16)  # the grouped kernels are bf16 ones
    moe.grouped_gemm = True
    x = torch.randn(3, 5, 64, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    with torch.no_grad():
        expected = moe(x)
        moe.stack_experts()
        got = moe(x)
    torch.testing.assert_close(got, expected)
    assert moe.experts[3].up_proj.weight.data_ptr() == moe.stacked[0][3, 32:].data_ptr()  # views, no copies
    after = moe.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_greedy_equals_full_forward_on_device(device, variant):
    model = tiny_model(device, **VARIANTS[variant]).eval()
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42] * 9]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [reference_greedy(model, prompt, 8) for prompt in prompts]
    assert [o.outputs[0].token_ids for o in LLM(model, block_size=4).generate(prompts, params)] == expected
    spec = LLM(model, block_size=4, speculative_mtp=2, speculative_max_batch=8)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == expected
    assert spec.runner.cache.pool.device.type == torch.device(device).type


def test_seeded_samples_are_drawn_on_the_device_and_ignore_their_neighbours(device, monkeypatch):
    """Each sequence's generator lives on the model's device (host-side noise for 256 x 32k
    logits cost more than a graphed decode step): a seeded request samples the same tokens alone,
    in a batch, and with MTP speculation's acceptance tests drawing from the same generators."""
    model = tiny_model(device).eval()
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    llm = LLM(model, block_size=4)
    alone = llm.generate([[5, 6, 7]], seeded)[0].outputs[0].token_ids
    batched = llm.generate([[1, 2], [5, 6, 7], [9] * 6], [other, seeded, other])[1].outputs[0].token_ids
    assert alone == batched and len(alone) == 8
    seq_generators = []
    original = LLM._enqueue

    def spy(self, *args, **kwargs):
        request_id = original(self, *args, **kwargs)
        seq_generators.extend(seq.generator for seq in self.requests[request_id].seqs)
        return request_id

    monkeypatch.setattr(LLM, "_enqueue", spy)
    spec = LLM(model, block_size=4, speculative_mtp=2, speculative_max_batch=8)
    first = spec.generate([[5, 6, 7]], seeded)[0].outputs[0].token_ids
    assert spec.generate([[5, 6, 7]], seeded)[0].outputs[0].token_ids == first and len(first) == 8
    assert spec.stats()["spec_draft_tokens"] > 0
    assert seq_generators and all(g.device.type == torch.device(device).type for g in seq_generators)


def test_decode_replays_cuda_graphs_on_a_gpu(device):
    """On a GPU, decode steps replay CUDA graphs (the runner's graphs fill up; enforce_eager=True
    keeps them off); on the CPU nothing is captured. A dense fp32 model decodes exactly as eagerly;
    a bf16 V3 model (MoE as grouped GEMMs) picks, at every step, a token whose logit under a plain
    bf16 forward of the same prefix is within bf16 noise of the best (ties may break either way)."""
    from nanoseek.model.dense import DenseTransformer, dense_preset

    cuda = torch.device(device).type == "cuda"
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42] * 9]
    # the batch shrinks as sequences finish: 3 (padded to 4 rows), then 1, which speculates below
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (8, 3, 5)]
    torch.manual_seed(0)
    dense = DenseTransformer(dense_preset("student-tiny", vocab_size=512)).to(device).eval()
    graphed, eager = LLM(dense, block_size=4), LLM(dense, block_size=4, enforce_eager=True)
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert bool(graphed.runner.graphs) == cuda and not eager.runner.graphs

    model = tiny_model(device).to(torch.bfloat16).eval()
    llm = LLM(model, block_size=4, speculative_mtp=1, speculative_max_batch=1)
    outs = llm.generate(prompts, params)
    assert bool(llm.runner.graphs) == cuda
    assert {T for _, T, *_ in llm.runner.graphs} == ({1, 2} if cuda else set())  # decode, and MTP verify
    assert any(g.mtp is not None for g in llm.runner.graphs.values()) == cuda  # the MTP run after a verify
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            ids = prompt + out.outputs[0].token_ids
            logits = model(torch.tensor([ids], device=device)).logits[0, len(prompt) - 1: -1].float()  # (n, V)
            chosen = logits.gather(1, torch.tensor(out.outputs[0].token_ids, device=device).unsqueeze(1))
            assert (logits.max(dim=1).values - chosen.squeeze(1)).max() < 0.05


@pytest.mark.parametrize("variant", ["v32", "mhc"])
def test_v32_and_mhc_decode_through_cuda_graphs_as_eagerly(device, variant):
    """On a GPU a V3.2 model (its indexer's sort and top-k gather captured in the graph) and an mHC
    model decode through CUDA graphs, MTP speculation's verify graphs included, with the eager
    tokens. fp32 with dense FFNs (first_k_dense_replace past the layers), so that graphs are
    captured in fp32 (an MoE's need bf16) and the two runs agree exactly, not within bf16 noise."""
    cuda = torch.device(device).type == "cuda"
    model = tiny_model(device, first_k_dense_replace=10, **VARIANTS[variant]).eval()
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42] * 9]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (14, 3, 10)]
    for speculative in (0, 1):
        graphed = LLM(model, block_size=4, speculative_mtp=speculative, speculative_max_batch=1)
        eager = LLM(model, block_size=4, speculative_mtp=speculative, speculative_max_batch=1, enforce_eager=True)
        got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
        assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
        assert bool(graphed.runner.graphs) == cuda and not eager.runner.graphs


def test_v4_forward_and_engine_greedy_on_device(device):
    """A DeepSeek-V4 model (sliding window, CSA with its indexer, HCA, hash routing, mHC) on the
    device: its logits equal the CPU's in fp32, and the engine (eager on a GPU: no CUDA graphs for
    V4) decodes the tokens of repeated no-cache forwards, past the window and the compression rates."""
    torch.manual_seed(0)
    cpu = Transformer(preset("v4-tiny")).eval()
    model = Transformer(preset("v4-tiny")).to(device).eval()
    model.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(model(ids.to(device)).logits.cpu(), cpu(ids).logits) < 1e-4
    prompts = [list(range(5, 25)), [3, 4], [42] * 9]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [reference_greedy(model, prompt, 12) for prompt in prompts]
    llm = LLM(model, block_size=4)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    assert not llm.runner.graphs


def test_rollout_graphs_read_the_trained_fp32_weights(device):
    """RL's engine decodes the trainer's fp32 weights under bf16 autocast. On a GPU those decode
    steps replay graphs too, whose recorded casts read the weights as they are at each replay: after
    an in-place update (the optimizer's), the same graphs pick tokens whose logits under a plain
    autocast forward of the updated model are within bf16 noise of the best."""
    cuda = torch.device(device).type == "cuda"
    kind = torch.device(device).type
    model = tiny_model(device).eval()  # fp32 weights, as the trainer keeps them
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42] * 9]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (8, 3, 5)]
    llm = LLM(model, block_size=4)
    for update in range(2):
        with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=cuda):
            if update:
                captured = set(llm.runner.graphs)
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
                llm.reset_prefix_cache()  # as RL does before each rollout: the cached prompts are stale
            outs = llm.generate(prompts, params)
            for prompt, out in zip(prompts, outs):
                ids = prompt + out.outputs[0].token_ids
                logits = model(torch.tensor([ids], device=device)).logits[0, len(prompt) - 1: -1].float()
                chosen = logits.gather(1, torch.tensor(out.outputs[0].token_ids, device=device).unsqueeze(1))
                assert (logits.max(dim=1).values - chosen.squeeze(1)).max() < 0.05
        assert bool(llm.runner.graphs) == cuda
    assert set(llm.runner.graphs) == captured  # the second round replayed the first round's graphs


def test_a_refused_capture_decodes_eagerly_and_leaves_cuda_as_it_was(device, capsys):
    """A forward with a host sync cannot be captured. The runner must find out before the capture
    starts (a capture that raises leaves the capture stream current and the allocator in capture
    mode): the engine then decodes eagerly, the same tokens, on the caller's stream."""
    from nanoseek.model.dense import DenseTransformer, dense_preset

    if torch.device(device).type != "cuda":
        pytest.skip("CUDA graphs only")
    torch.manual_seed(0)
    model = DenseTransformer(dense_preset("student-tiny", vocab_size=512)).to(device).eval()  # fp32: graphed
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model, block_size=4, enforce_eager=True).generate(prompts, params)]

    def host_sync(module, args, out) -> None:
        out.sum().item()  # legal eagerly, refused inside a capture

    hook = model.model.norm.register_forward_hook(host_sync)
    try:
        stream = torch.cuda.current_stream()
        got = [o.outputs[0].token_ids for o in LLM(model, block_size=4).generate(prompts, params)]
    finally:
        hook.remove()
    assert got == want
    assert "CUDA graph capture failed" in capsys.readouterr().err
    assert torch.cuda.current_stream() == stream
    assert torch.cuda.get_sync_debug_mode() == 0


def test_checkpoint_loads_in_the_devices_default_dtype(device, tmp_path):
    """`LLM(dir)` picks bf16 weights and cache on a GPU and fp32 on the CPU; bf16 logits stay close."""
    model = tiny_model("cpu").eval()
    save_model(model, tmp_path / "ckpt")
    llm = LLM(tmp_path / "ckpt", device=device)
    expected_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    assert next(llm.model.parameters()).dtype == expected_dtype and llm.runner.cache.pool.dtype == expected_dtype
    moes = [m for m in llm.model.modules() if isinstance(m, MoE)]
    assert moes and all((m.stacked is not None) == (expected_dtype == torch.bfloat16) for m in moes)
    bf16 = LLM(tmp_path / "ckpt", device=device, dtype="bfloat16")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(ids).logits
        got = bf16.model(ids.to(device)).logits
    assert relative_error(got.cpu(), ref) < 0.05
    out = bf16.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6


def test_cuda_without_a_gpu_names_the_cli_flag(monkeypatch, tmp_path, capsys):
    """The fix the message gives is what a CLI user types (`--device cpu`), not `device=cpu` alone."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    save_model(tiny_model("cpu"), tmp_path / "ckpt")
    assert cli_main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "x", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and "--device cpu" in err and "Traceback" not in err


# ------------------------------------------------------------ every CLI stage on the device


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    """A jsonl task of sums, a tokenizer for it, and a chat jsonl (no reasoning-gym needed)."""
    d = tmp_path_factory.mktemp("devices")
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(10) for b in range(10)]
    (d / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = random.Random(0)
    chats = [{"messages": [{"role": "user", "content": r["question"]},
                           {"role": "assistant", "content": f"<think> sum </think> <answer>{r['answer']}</answer>"}]}
             for r in rng.sample(rows, 40)]
    (d / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    texts = [r1zero_prompt(r["question"]) + r1zero_completion("sum", r["answer"]) for r in rows]
    tok = train_tokenizer(texts + [json.dumps(c) for c in chats], vocab_size=400)
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 3))
    tok.save(d / "tok")
    # a teacher that has memorised worked solutions of the train split: distillation keeps traces
    problems = get_task(f"jsonl:{d / 'task.jsonl'}").problems(4, seed=0, split="train")
    lessons = [(r1zero_prompt(p.question), r1zero_completion("sum", p.answer)) for p in problems]
    torch.manual_seed(0)
    teacher = Transformer(preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                 eos_token_id=tok.eos_id, n_routed_experts=0, num_nextn_predict_layers=0))
    memorise(teacher, [tokenize_prompt_completion(p, c, tok) for p, c in lessons])
    save_model(teacher, d / "teacher", tokenizer=tok)
    return d


def test_every_stage_runs_on_the_device(device, arithmetic, tmp_path, capsys):
    d, dev = arithmetic, str(device)
    task = f"jsonl:{d / 'task.jsonl'}"
    common = ["tensorboard=false", "threads=1", f"device={dev}"]
    assert cli_main(["pretrain", "--config", "configs/pretrain_tiny.toml", f"out_dir={tmp_path / 'base'}",
                     f"data={json.dumps([str(d / 'corpus.jsonl')])}", "max_steps=2", "vocab_size=400", *common]) == 0
    base = tmp_path / "base" / "latest"
    assert cli_main(["eval", "--model", str(base), "--task", task, "--n", "4", "--max-tokens", "8",
                     "--device", dev, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n"] == 4
    assert cli_main(["generate", "--model", str(base), "--prompt", "What is", "--max-tokens", "5",
                     "--speculative-mtp", "1", "--device", dev]) == 0
    assert cli_main(["rl", "--config", "configs/rl_r1zero_tiny.toml", f"init={base}", f"task={task}",
                     f"out_dir={tmp_path / 'rl'}", "max_steps=1", "eval_every=0", *common]) == 0
    assert cli_main(["sft", "--config", "configs/sft_tiny.toml", f"tokenizer={d / 'tok'}",
                     f"data={json.dumps([str(d / 'chats.jsonl')])}", f"out_dir={tmp_path / 'sft'}",
                     "max_steps=2", *common]) == 0
    assert cli_main(["distill", "--teacher", str(d / "teacher"), "--student", "student-tiny", "--task", task,
                     f"out_dir={tmp_path / 'distill'}", "num_prompts=4", "samples_per_prompt=2", "temperature=0.5",
                     "max_new_tokens=24", "max_steps=1", "batch_size=2", "seq_len=128", "val_fraction=0",
                     "warmup_steps=1", *common]) == 0
    for run in ("base", "rl", "sft", "distill"):
        metrics = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert all(all(v == v for v in m.values() if isinstance(v, float)) for m in metrics), run  # no NaN
    student = nanoseek.load_model(tmp_path / "sft" / "latest")
    assert student.config.vocab_size > 0


def test_server_answers_on_the_device(device, arithmetic, tmp_path):
    from fastapi.testclient import TestClient

    from nanoseek.serve.api import create_app
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(arithmetic / "tok")
    model = tiny_model(device, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id).eval()
    with TestClient(create_app(LLM(model, tok), model_name="tiny")) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "What is 2 + 3?"}],
            "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6


def test_gpu_recipe_runs_two_steps_on_cpu_at_a_reduced_size(arithmetic, tmp_path):
    """configs/pretrain_gpu.toml as a GPU user runs it, shrunk to seconds on the CPU."""
    small = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
             "model.num_key_value_heads=2", "model.intermediate_size=128", "model.moe_intermediate_size=32",
             "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.n_routed_experts=8", "model.n_group=2",
             "model.topk_group=1", "model.num_experts_per_tok=2"]
    assert cli_main(["pretrain", "--config", "configs/pretrain_gpu.toml", f"out_dir={tmp_path / 'gpu'}",
                     f"data={json.dumps([str(arithmetic / 'corpus.jsonl')])}", "vocab_size=400", "max_steps=2",
                     "batch_size=2", "micro_batch_size=2", "seq_len=64", "device=cpu", "dtype=float32",
                     "compile=false", "eval_every=0", "sample_every=0", "threads=1", *small]) == 0
    cfg = json.loads((tmp_path / "gpu" / "latest" / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["n_shared_experts"] == 1 and cfg["qk_rope_head_dim"] == 32
