"""Training stages, one readable loop each, on machinery that exists once:

    pretrain.py       next-token + MTP loss, aux-loss-free expert balancing    `nanoseek pretrain`
    sft.py            supervised fine-tuning                                   `nanoseek sft`
    distill.py        R1-Distill: verified teacher traces -> student SFT       `nanoseek distill`
    grpo.py           R1-Zero: GRPO with verifiable rewards                     `nanoseek rl`
    grm.py            DeepSeek-GRM: a recipe of steps (cold start, RFT, RL,     `nanoseek grm`
                      meta RM, evaluation) on sft's and grpo's machinery

    stage.py          what every stage shares at its edges: the CLI and exit status, torchrun,
                      the model named by init=, text samples
    trainer.py        the Trainer: optimizer step, accumulation, precision, schedule, end-of-step
                      work (validate, sample, save, stop), Ctrl-C, validation loss
    checkpointing.py  run directories: checkpoint-<step>/ + trainer_state, latest, prune, RNG state
    config.py         run configs: TOML + key=value overrides, validation
    distributed.py    torchrun processes, seeding, the cross-rank sum
    metrics.py        metrics.jsonl (+ TensorBoard)

Modules are imported on demand (`from nanoseek.train import pretrain`), so importing the package
costs nothing.
"""
