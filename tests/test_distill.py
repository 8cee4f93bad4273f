"""Distillation: the rejection filter keeps only verified traces, and a tiny end-to-end
`nanoseek distill` (tiny teacher, a few prompts) writes the jsonl dataset and a student checkpoint."""

import json
import os

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import read_tensors
from nanoseek.cli import main as cli_main
from nanoseek.config import preset
from nanoseek.data.tasks import get_task, r1zero_completion, r1zero_prompt
from nanoseek.model.dense import DenseTransformer
from nanoseek.model.transformer import IGNORE_INDEX, Transformer
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train import distill
from nanoseek.train.distill import DistillConfig, distill_problems, is_verified, sampling_recipe, verify
from nanoseek.train.sft import tokenize_prompt_completion

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_rejection_filter_keeps_only_right_and_well_formed_traces():
    problem = get_task("chain_sum").problems(1, seed=0, split="train")[0]
    right = problem.answer
    wrong = str(int(right) + 1)
    partial = right + "1"  # chain_sum gives partial credit to a near miss
    assert 0 < problem.task.score(partial, problem) < 1
    cases = {
        f" 3 + 4 = 7. </think> <answer>{right}</answer>": True,
        f"<think> steps </think> <answer>{right}</answer>": True,  # the model wrote the prefilled tag again
        f" </think> <answer>{right}</answer>": True,  # empty reasoning is still the format
        f" 3 + 4 = 7. </think> <answer>{wrong}</answer>": False,  # wrong answer
        f" 3 + 4 = 7. </think> <answer>{partial}</answer>": False,  # partial credit is not a pass
        f" 3 + 4 = 7. </think> {right}": False,  # right answer, no answer tags
        f" 3 + 4 = 7. </think> <answer>{right}</answer> more text": False,  # trailing text
        f" 3 + 4 = 7. <answer>{right}</answer>": False,  # reasoning never closed
        f" </think> </think> <answer>{right}</answer>": False,  # a tag twice
    }
    for completion, keep in cases.items():
        assert is_verified(verify(completion, problem)) is keep, completion


def test_task_args_set_the_difficulty_of_the_distillation_prompts():
    cfg = DistillConfig(task="chain_sum", task_args={"min_terms": 5, "max_terms": 5}, num_prompts=6)
    task, problems = distill_problems(cfg)
    assert len(problems) == 6
    for p in problems:
        assert len(p.metadata["entry"]["metadata"]["expression"].split()) == 9  # 5 terms, 4 operators
        assert p.task is not None and p.task.score(p.answer, p) == 1.0
    # the recipe records the difficulty, so traces made at another difficulty are not reused
    assert sampling_recipe(cfg)["task_args"] == {"min_terms": 5, "max_terms": 5}


@pytest.fixture(scope="module")
def memorised_teacher(tmp_path_factory):
    """A tiny DeepSeek-V3 teacher in <dir>/teacher that has memorised worked solutions to the
    4 problems of a jsonl task, the last one's answer wrong. Returns (dir, task name, problems)."""
    tmp_path = tmp_path_factory.mktemp("teacher")
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(1, 5) for b in range(1, 5)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task_name = f"jsonl:{tmp_path / 'task.jsonl'}"
    problems = get_task(task_name).problems(4, seed=0, split="train")
    # the teacher's lesson: worked solutions, the last problem's with a wrong answer
    docs = []
    for i, p in enumerate(problems):
        a, b = p.question.removeprefix("What is ").removesuffix("?").split(" + ")
        answer = p.answer if i < 3 else str(int(p.answer) + 1)
        docs.append((r1zero_prompt(p.question), r1zero_completion(f"{a} + {b} = {answer}.", answer)))
    tok = train_tokenizer([p + c for p, c in docs] * 20, 400)
    torch.manual_seed(0)
    # MLA with dense FFNs: it memorises in a few seconds (routing makes tiny MoEs slow learners)
    teacher = Transformer(preset("tiny", vocab_size=tok.vocab_size, n_routed_experts=0, num_nextn_predict_layers=0))
    threads = torch.get_num_threads()  # a module fixture runs before the one_thread fixture
    torch.set_num_threads(1)
    try:
        memorise(teacher, [tokenize_prompt_completion(p, c, tok) for p, c in docs])
    finally:
        torch.set_num_threads(threads)
    nanoseek.save_model(teacher, tmp_path / "teacher", tokenizer=tok)
    return tmp_path, task_name, problems


def test_distill_end_to_end(memorised_teacher, tmp_path, capsys):
    """A tiny DeepSeek-V3 teacher that has memorised worked solutions to a few problems (some of
    them wrong), sampled by the engine; only verified traces reach the jsonl; a student-tiny is
    fine-tuned on them with logit distillation; the result is a Llama checkpoint that loads."""
    teacher_dir, task_name, problems = memorised_teacher
    out = tmp_path / "run"
    cli_main(["distill", "--teacher", str(teacher_dir / "teacher"), "--student", "student-tiny", "--task", task_name,
              f"out_dir={out}", "num_prompts=4", "samples_per_prompt=3", "temperature=0.5", "max_new_tokens=24",
              "kd_weight=0.5", "max_steps=3", "batch_size=2", "seq_len=128", "val_fraction=0", "warmup_steps=1",
              "tensorboard=false", "threads=1"])

    summary = json.loads((out / "traces.summary.json").read_text())
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert summary["samples"] == 12 and summary["rows"] == len(traces) > 0
    assert summary["verified"] < summary["samples"]  # the wrongly taught problem is filtered out
    by_question = {p.question: p for p in problems}
    for row in traces:
        problem = by_question[row["metadata"]["question"]]
        assert is_verified(verify(row["completion"], problem)) and row["metadata"]["answer"] == problem.answer
        assert row["prompt"] == r1zero_prompt(problem.question)
        assert row["messages"] == [{"role": "user", "content": problem.question},
                                   {"role": "assistant", "content": "<think>" + row["completion"]}]
    assert problems[3].question not in {row["metadata"]["question"] for row in traces}

    student = nanoseek.load_model(out / "latest")
    assert isinstance(student, DenseTransformer) and student.config.vocab_size == student_vocab(teacher_dir)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in m for m in metrics)

    # --resume with another sampling recipe would re-sample the traces under the half-trained student
    traces_before = (out / "traces.jsonl").read_text()
    assert cli_main(["distill", "--teacher", str(teacher_dir / "teacher"), "--student", "student-tiny", "--task",
                     task_name, f"out_dir={out}", "num_prompts=4", "samples_per_prompt=2", "temperature=0.5",
                     "max_new_tokens=24", "kd_weight=0.5", "max_steps=4", "batch_size=2", "seq_len=128",
                     "val_fraction=0", "warmup_steps=1", "tensorboard=false", "threads=1", "--resume"]) == 2
    assert "samples_per_prompt 3 -> 2" in capsys.readouterr().err
    assert (out / "traces.jsonl").read_text() == traces_before


def test_sampling_killed_midway_resumes_after_its_last_chunk(memorised_teacher, tmp_path, monkeypatch):
    """Chunks of 2 prompts (max_num_seqs=1, 2 samples each): killed in the second chunk, the re-run
    samples only the chunks left and writes the traces an uninterrupted run writes."""
    teacher_dir, task_name, _ = memorised_teacher
    settings = dict(teacher=str(teacher_dir / "teacher"), task=task_name, num_prompts=6, samples_per_prompt=2,
                    max_num_seqs=1, temperature=0.5, max_new_tokens=24)
    whole = distill.sample_traces(DistillConfig(out_dir=str(tmp_path / "whole"), **settings))

    cfg = DistillConfig(out_dir=str(tmp_path / "killed"), **settings)
    real, chunks, kill_at = distill.sample_prompts, [], [2]

    def counted(llm, task, problems, indices, cfg):
        chunks.append(indices)
        if len(chunks) in kill_at:
            raise RuntimeError("killed")  # as a kill would stop it: in the middle of a chunk
        return real(llm, task, problems, indices, cfg)

    monkeypatch.setattr(distill, "sample_prompts", counted)
    with pytest.raises(RuntimeError, match="killed"):
        distill.sample_traces(cfg)
    assert distill.partial_path(cfg.dataset_path).is_file() and not cfg.dataset_path.exists()
    chunks.clear()
    kill_at.clear()
    resumed = distill.sample_traces(cfg)
    assert chunks == [[2, 3], [4, 5]]  # the first chunk was kept
    assert (tmp_path / "killed" / "traces.jsonl").read_text() == (tmp_path / "whole" / "traces.jsonl").read_text()
    assert {k: v for k, v in resumed.items() if k not in ("seconds", "tokens_per_s")} == \
        {k: v for k, v in whole.items() if k not in ("seconds", "tokens_per_s")}
    assert not distill.partial_path(cfg.dataset_path).exists()


@pytest.mark.parametrize("student, data, message", [
    ("nowhere", [], "--student nowhere is neither a checkpoint directory nor a preset"),
    ("student-tiny", ["missing.jsonl"], "SFT data file missing.jsonl not found"),
])
def test_student_and_data_are_checked_before_the_teacher_is_sampled(student, data, message, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(distill, "sample_traces", lambda *args: pytest.fail("sampled the teacher before the check"))
    assert cli_main(["distill", "--teacher", str(tmp_path), "--student", student, f"out_dir={tmp_path / 'run'}",
                     f"data={json.dumps(data)}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_student_tokenizer_logit_distillation_cannot_use_is_an_error_before_the_teacher_is_sampled(
        tmp_path, monkeypatch, capsys):
    """kd_weight > 0 compares logits id by id: a student checkpoint with another vocabulary was found
    out by SFT, after the teacher had been sampled (minutes at real size)."""
    docs = [f"What is {a} + {b}? {a + b}" for a in range(10) for b in range(10)]
    for name, extra in (("teacher", []), ("student", ["quokka zebra " * 20] * 50)):
        tok = train_tokenizer(docs * 5 + extra, 300)
        torch.manual_seed(0)
        model = Transformer(preset("tiny", vocab_size=tok.vocab_size, n_routed_experts=0, num_nextn_predict_layers=0))
        nanoseek.save_model(model, tmp_path / name, tokenizer=tok)
    monkeypatch.setattr(distill, "sample_traces", lambda *args: pytest.fail("sampled the teacher before the check"))
    argv = ["distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
            f"out_dir={tmp_path / 'run'}", "task=digit_sum"]
    assert cli_main([*argv, "kd_weight=0.5"]) == 2
    err = capsys.readouterr().err
    assert "logit distillation needs the teacher's tokenizer" in err and "Traceback" not in err
    # without logit distillation the student reads the traces' text with its own tokenizer: no check
    with pytest.raises(pytest.fail.Exception, match="sampled the teacher"):
        cli_main([*argv, "kd_weight=0"])


def student_vocab(teacher_dir) -> int:
    return nanoseek.tokenizer.Tokenizer.from_dir(teacher_dir / "teacher").vocab_size


def memorise(model, examples, max_steps: int = 1000):
    """Overfit `model` on the completions of a few (ids, mask) examples (~100 steps). One thread:
    a multi-threaded BLAS may split its sums differently under load, and one run in a loaded CI
    took a trajectory that stalled at loss 0.033 past 400 steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _memorise(model, examples, max_steps)
    finally:
        torch.set_num_threads(threads)


def _memorise(model, examples, max_steps: int):
    T = max(len(ids) for ids, _ in examples)
    inputs = torch.tensor([ids[:-1] + [2] * (T - len(ids)) for ids, _ in examples])
    labels = torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX] * (T - len(ids))
                           for ids, mask in examples])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(max_steps):
        loss = model(inputs, labels=labels).loss
        if loss.item() < 0.02:
            return
        loss.backward()
        opt.step()
        opt.zero_grad()
    raise AssertionError(f"the teacher did not memorise its lesson (loss {loss.item():.3f})")


def test_ranks_share_the_teacher_sampling_and_train_the_same_student(memorised_teacher, tmp_path):
    """Under torchrun each rank samples its share of the prompts, each with the prompt's own seed,
    and rank 0 alone writes the dataset (it was every rank sampling every prompt, and writing)."""
    import subprocess
    import sys

    teacher_dir, task_name, _ = memorised_teacher
    args = ["distill", "--teacher", str(teacher_dir / "teacher"), "--student", "student-tiny", "--task", task_name,
            "num_prompts=4", "samples_per_prompt=3", "temperature=0.5", "max_new_tokens=24", "max_steps=2",
            "batch_size=2", "seq_len=128", "val_fraction=0", "warmup_steps=1", "tensorboard=false", "threads=1"]
    cli_main([*args, f"out_dir={tmp_path / 'one'}"])
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "nanoseek.cli", *args, f"out_dir={tmp_path / 'two'}"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("sampling 3 traces") == 1
    assert (tmp_path / "two" / "traces.jsonl").read_text() == (tmp_path / "one" / "traces.jsonl").read_text()
    one, two = (json.loads((tmp_path / run / "traces.summary.json").read_text()) for run in ("one", "two"))
    for key in ("samples", "verified", "rows", "generated_tokens"):
        assert one[key] == two[key]
    a, b = read_tensors(tmp_path / "one" / "latest"), read_tensors(tmp_path / "two" / "latest")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
