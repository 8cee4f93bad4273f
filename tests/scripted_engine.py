"""A stand-in for `LLM` in evaluation tests: scripted completions, no model."""

from dataclasses import dataclass


@dataclass
class Completion:
    text: str
    token_ids: list
    finish_reason: str = "stop"


@dataclass
class Output:
    outputs: list


class ScriptedEngine:
    """Answers prompt i with the completions `script(i)` gives (one token per character), and
    records what it was asked: `prompts` and, per generate call, its list of params (`calls`)."""

    def __init__(self, script):
        self.script, self.prompts, self.calls = script, [], []

    def generate(self, prompts, params):
        self.prompts += prompts
        self.calls.append(params)
        return [Output([Completion(t, [0] * len(t)) for t in self.script(i)]) for i in range(len(prompts))]


class ScriptedServingEngine:
    """A stand-in for `LLM` behind the server (`create_app`): no model, each request's output is
    `script(prompt_text)`, released `chunk` characters per engine step so that streaming sees it in
    pieces. Records what it was asked: the prompt texts (`prompts`) and the SamplingParams (`params`)."""

    def __init__(self, tokenizer, script, chunk: int = 3, max_model_len: int = 4096):
        from types import SimpleNamespace

        self.tokenizer, self.script, self.chunk, self.max_model_len = tokenizer, script, chunk, max_model_len
        self.scheduler = SimpleNamespace(max_num_seqs=8)
        self.requests: dict = {}  # request id -> [prompt ids, params, output text, characters released]
        self.prompts, self.params = [], []

    def prompt_ids(self, prompt, add_bos: bool = True) -> list:
        self.prompts.append(prompt)
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def prepare_constraint(self, params) -> None:
        pass

    def add_request(self, prompt, params, request_id: str) -> None:
        self.params.append(params)
        self.requests[request_id] = [prompt, params, self.script(self.tokenizer.decode(prompt)), 0]

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> dict:
        return {}

    def step(self) -> list:
        from nanoseek.inference.sequence import CompletionOutput, RequestOutput

        outputs = []
        for request_id, r in list(self.requests.items()):
            prompt, params, text, released = r
            r[3] = released = min(len(text), released + self.chunk)
            done = released == len(text)
            ids = self.tokenizer.encode(text[:released])
            completions = [CompletionOutput(index=i, text=text[:released], token_ids=ids,
                                            finish_reason="stop" if done else None, logprobs=None,
                                            cumulative_logprob=0.0) for i in range(params.n)]
            outputs.append(RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=list(prompt),
                                         outputs=completions, finished=done, num_cached_tokens=0))
            if done:
                del self.requests[request_id]
        return outputs
