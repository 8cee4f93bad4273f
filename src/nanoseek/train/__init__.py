"""Training stages, one readable loop each, on the shared machinery in `loop`:

    loop.py      run configs (TOML + key=value), distributed setup, optimizer and schedule,
                 the Trainer (step, metrics, checkpoints, exact resume, Ctrl-C), eval and sampling
    pretrain.py  next-token + MTP loss, aux-loss-free expert balancing     `nanoseek pretrain`
    sft.py       supervised fine-tuning                                    `nanoseek sft`
    distill.py   R1-Distill: verified teacher traces -> student SFT        `nanoseek distill`
    grpo.py      R1-Zero: GRPO with verifiable rewards                      `nanoseek rl`

Modules are imported on demand (`from nanoseek.train import pretrain`), so importing the package
costs nothing.
"""
