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
